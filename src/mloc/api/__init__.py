"""The orchestrator's HTTP API."""

from mloc.api.app import create_app

__all__ = ["create_app"]
