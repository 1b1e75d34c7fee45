"""A Salla-compatible local Admin API and store for `run`, tests and benchmarks."""

from service.sandbox.app import Sandbox, create_sandbox_app

__all__ = ["Sandbox", "create_sandbox_app"]
