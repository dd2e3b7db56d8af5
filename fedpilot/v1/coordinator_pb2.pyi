from fedpilot.v1 import errors_pb2 as _errors_pb2
from fedpilot.v1 import profile_pb2 as _profile_pb2
from fedpilot.v1 import transfer_pb2 as _transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_IDLE: _ClassVar[WorkerState]
    WORKER_STATE_PROFILING: _ClassVar[WorkerState]
    WORKER_STATE_TRAINING: _ClassVar[WorkerState]
    WORKER_STATE_UPLOADING: _ClassVar[WorkerState]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_PROFILE: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_IDLE: WorkerState
WORKER_STATE_PROFILING: WorkerState
WORKER_STATE_TRAINING: WorkerState
WORKER_STATE_UPLOADING: WorkerState
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_PROFILE: TaskKind
TASK_KIND_TRAIN: TaskKind

class DeviceInfo(_message.Message):
    __slots__ = ("kind", "name", "total_memory_bytes", "free_memory_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., free_memory_bytes: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "labels", "device", "budget_bytes", "enrollment_secret")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    device: DeviceInfo
    budget_bytes: int
    enrollment_secret: str
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., budget_bytes: _Optional[int] = ..., enrollment_secret: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "token", "heartbeat_interval_ms", "poll_keeps_alive")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    POLL_KEEPS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    token: str
    heartbeat_interval_ms: int
    poll_keeps_alive: bool
    def __init__(self, worker_id: _Optional[str] = ..., token: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., poll_keeps_alive: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "state", "task_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: WorkerState
    task_id: str
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "abandon_task", "poll_keeps_alive")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ABANDON_TASK_FIELD_NUMBER: _ClassVar[int]
    POLL_KEEPS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    abandon_task: bool
    poll_keeps_alive: bool
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., abandon_task: _Optional[bool] = ..., poll_keeps_alive: _Optional[bool] = ...) -> None: ...

class ReportProfileRequest(_message.Message):
    __slots__ = ("worker_id", "job_id", "task_id", "profile")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_id: str
    task_id: str
    profile: _profile_pb2.MemoryProfile
    def __init__(self, worker_id: _Optional[str] = ..., job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., profile: _Optional[_Union[_profile_pb2.MemoryProfile, _Mapping]] = ...) -> None: ...

class ReportProfileResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PollTaskRequest(_message.Message):
    __slots__ = ("worker_id", "wait_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    wait_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = ("model", "task", "num_labels", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "batch_size", "max_seq_len", "dtype", "learning_rate", "weight_decay", "local_steps", "local_epochs", "ig_probe_batches", "seed", "dataset", "label_names", "payload_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    IG_PROBE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: str
    num_labels: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    batch_size: int
    max_seq_len: int
    dtype: str
    learning_rate: float
    weight_decay: float
    local_steps: int
    local_epochs: int
    ig_probe_batches: int
    seed: int
    dataset: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    payload_dtype: str
    def __init__(self, model: _Optional[str] = ..., task: _Optional[str] = ..., num_labels: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., batch_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., dtype: _Optional[str] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., local_steps: _Optional[int] = ..., local_epochs: _Optional[int] = ..., ig_probe_batches: _Optional[int] = ..., seed: _Optional[int] = ..., dataset: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., payload_dtype: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "kind", "config", "modules", "adapter_version", "predicted_peak_bytes", "deadline_unix_ms", "adapter", "adapter_data")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DATA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    config: JobConfig
    modules: _containers.RepeatedScalarFieldContainer[str]
    adapter_version: int
    predicted_peak_bytes: int
    deadline_unix_ms: int
    adapter: _transfer_pb2.AdapterManifest
    adapter_data: bytes
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ..., modules: _Optional[_Iterable[str]] = ..., adapter_version: _Optional[int] = ..., predicted_peak_bytes: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., adapter: _Optional[_Union[_transfer_pb2.AdapterManifest, _Mapping]] = ..., adapter_data: _Optional[bytes] = ...) -> None: ...

class PollTaskResponse(_message.Message):
    __slots__ = ("task", "heartbeat_interval_ms")
    TASK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    task: Task
    heartbeat_interval_ms: int
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class RefuseTaskRequest(_message.Message):
    __slots__ = ("worker_id", "task_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task_id: str
    reason: _errors_pb2.ErrorDetail
    def __init__(self, worker_id: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[_Union[_errors_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class RefuseTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("worker_id", "job_id", "version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_id: str
    version: int
    def __init__(self, worker_id: _Optional[str] = ..., job_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("update_id", "duplicate")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    duplicate: bool
    def __init__(self, update_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...
