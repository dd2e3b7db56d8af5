from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_BF16: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class PayloadManifest(_message.Message):
    __slots__ = ("tensors", "total_bytes", "sha256", "blake3")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    sha256: str
    blake3: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., blake3: _Optional[str] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: AdapterManifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[AdapterManifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("job_id", "version", "payload", "lora_rank", "lora_alpha", "target_modules", "modules_to_save")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    payload: PayloadManifest
    lora_rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., payload: _Optional[_Union[PayloadManifest, _Mapping]] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., modules_to_save: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateManifest(_message.Message):
    __slots__ = ("worker_id", "job_id", "round", "task_id", "base_version", "payload", "num_samples", "train_loss_before", "train_loss_after", "local_scores", "predicted_peak_bytes", "measured_peak_bytes", "train_seconds")
    class LocalScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_id: str
    round: int
    task_id: str
    base_version: int
    payload: PayloadManifest
    num_samples: int
    train_loss_before: float
    train_loss_after: float
    local_scores: _containers.ScalarMap[str, float]
    predicted_peak_bytes: int
    measured_peak_bytes: int
    train_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., base_version: _Optional[int] = ..., payload: _Optional[_Union[PayloadManifest, _Mapping]] = ..., num_samples: _Optional[int] = ..., train_loss_before: _Optional[float] = ..., train_loss_after: _Optional[float] = ..., local_scores: _Optional[_Mapping[str, float]] = ..., predicted_peak_bytes: _Optional[int] = ..., measured_peak_bytes: _Optional[int] = ..., train_seconds: _Optional[float] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: UpdateManifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[UpdateManifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
