"""A Salla-compatible local Admin API for `run`, tests and benchmarks."""

from service.sandbox.app import create_sandbox_app

__all__ = ["create_sandbox_app"]
