"""What both services need to speak the fedpilot.v1 contract.

Payload encoding and verification, error details and proto <-> core
conversion live here, so the coordinator's servicer and the worker's client
stay thin and agree by construction.
"""

from fedpilot.wire.errors import WireError, error_detail_from_rpc_error, rich_status
from fedpilot.wire.payload import (
    MAX_CHUNK_BYTES,
    EncodedPayload,
    PayloadReceiver,
    decode_tensors,
    encode_tensors,
    iter_chunks,
)
from fedpilot.wire.serde import memory_from_proto, memory_to_proto

__all__ = [
    "MAX_CHUNK_BYTES",
    "EncodedPayload",
    "PayloadReceiver",
    "WireError",
    "decode_tensors",
    "encode_tensors",
    "error_detail_from_rpc_error",
    "iter_chunks",
    "memory_from_proto",
    "memory_to_proto",
    "rich_status",
]
