"""The service's face: router, client (`Cluster`), CLI, dashboard and benchmarks."""

from cluster.client import Cluster
from worker.request import Request, Result

__all__ = ["Cluster", "Request", "Result"]
