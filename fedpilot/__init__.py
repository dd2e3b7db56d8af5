"""fedpilot: federated LoRA fine-tuning for clients with heterogeneous GPU memory."""

__version__ = "0.1.0"
