"""The worker layer: an Engine (no Ray) and the thin Ray actor around it."""

from worker.request import Request, Result

__all__ = ["Request", "Result"]
