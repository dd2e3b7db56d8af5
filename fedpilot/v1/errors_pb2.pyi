from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_WORKER: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_TOKEN: _ClassVar[ErrorReason]
    ERROR_REASON_ENROLLMENT_REFUSED: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_JOB: _ClassVar[ErrorReason]
    ERROR_REASON_WRONG_ROUND: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_ASSIGNED: _ClassVar[ErrorReason]
    ERROR_REASON_ROUND_CLOSED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_ADAPTER_VERSION: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED: _ClassVar[ErrorReason]
    ERROR_REASON_MODULE_NOT_ASSIGNED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_TENSOR: _ClassVar[ErrorReason]
    ERROR_REASON_SHAPE_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_DTYPE_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_NON_FINITE: _ClassVar[ErrorReason]
    ERROR_REASON_SIZE_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_CHECKSUM_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_CHUNK_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_TRUNCATED: _ClassVar[ErrorReason]
    ERROR_REASON_BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_OUT_OF_MEMORY: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_UNKNOWN_WORKER: ErrorReason
ERROR_REASON_BAD_TOKEN: ErrorReason
ERROR_REASON_ENROLLMENT_REFUSED: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_UNKNOWN_JOB: ErrorReason
ERROR_REASON_WRONG_ROUND: ErrorReason
ERROR_REASON_NOT_ASSIGNED: ErrorReason
ERROR_REASON_ROUND_CLOSED: ErrorReason
ERROR_REASON_UNKNOWN_ADAPTER_VERSION: ErrorReason
ERROR_REASON_MALFORMED: ErrorReason
ERROR_REASON_MODULE_NOT_ASSIGNED: ErrorReason
ERROR_REASON_UNKNOWN_TENSOR: ErrorReason
ERROR_REASON_SHAPE_MISMATCH: ErrorReason
ERROR_REASON_DTYPE_MISMATCH: ErrorReason
ERROR_REASON_NON_FINITE: ErrorReason
ERROR_REASON_SIZE_MISMATCH: ErrorReason
ERROR_REASON_CHECKSUM_MISMATCH: ErrorReason
ERROR_REASON_CHUNK_TOO_LARGE: ErrorReason
ERROR_REASON_STREAM_TOO_LARGE: ErrorReason
ERROR_REASON_TRUNCATED: ErrorReason
ERROR_REASON_BUDGET_EXCEEDED: ErrorReason
ERROR_REASON_MODEL_UNAVAILABLE: ErrorReason
ERROR_REASON_OUT_OF_MEMORY: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason

class ErrorDetail(_message.Message):
    __slots__ = ("reason", "message", "field", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    message: str
    field: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
