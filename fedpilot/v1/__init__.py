"""Generated gRPC contract fedpilot.v1 (do not edit; run `make protos`)."""
