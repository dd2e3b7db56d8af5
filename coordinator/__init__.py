"""The coordinator service (imported as ``fedpilot.coordinator``).

Holds round state, assigns modules with :mod:`fedpilot.core`, aggregates
uploads and serves the gRPC contract of :mod:`fedpilot.v1`.
"""
