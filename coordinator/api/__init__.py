"""The coordinator's HTTP surface: REST API under ``/api/v1``, health, metrics, dashboard."""

from fedpilot.coordinator.api.app import create_app

__all__ = ["create_app"]
