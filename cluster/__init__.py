"""The service's face: router, client (`Cluster`), CLI, dashboard and benchmarks.

`Cluster` brings Ray, torch and transformers with it, so it is imported on
first use: the dashboard, which needs only Redis, imports `cluster.dashboard`
without them.
"""

from worker.request import Request, Result

__all__ = ["Cluster", "Request", "Result"]


def __getattr__(name: str):
    if name == "Cluster":
        from cluster.service.client import Cluster

        globals()["Cluster"] = Cluster  # later lookups skip this function
        return Cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
