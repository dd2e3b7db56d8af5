"""The worker service (imported as ``fedpilot.worker``).

Measures its memory, scores modules on local data and trains the LoRA
modules the coordinator assigns, with torch, transformers and peft.
"""
