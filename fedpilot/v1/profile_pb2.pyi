from fedpilot.v1 import transfer_pb2 as _transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProfileMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROFILE_METHOD_UNSPECIFIED: _ClassVar[ProfileMethod]
    PROFILE_METHOD_CUDA_PEAK: _ClassVar[ProfileMethod]
    PROFILE_METHOD_SAVED_TENSORS: _ClassVar[ProfileMethod]
PROFILE_METHOD_UNSPECIFIED: ProfileMethod
PROFILE_METHOD_CUDA_PEAK: ProfileMethod
PROFILE_METHOD_SAVED_TENSORS: ProfileMethod

class ModuleCost(_message.Message):
    __slots__ = ("name", "layer", "param_bytes", "extra_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    param_bytes: int
    extra_bytes: int
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., param_bytes: _Optional[int] = ..., extra_bytes: _Optional[int] = ...) -> None: ...

class MemoryProfile(_message.Message):
    __slots__ = ("config_key", "base_bytes", "layer_activation_bytes", "modules", "budget_bytes", "method", "device", "tensors")
    CONFIG_KEY_FIELD_NUMBER: _ClassVar[int]
    BASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    config_key: str
    base_bytes: int
    layer_activation_bytes: _containers.RepeatedScalarFieldContainer[int]
    modules: _containers.RepeatedCompositeFieldContainer[ModuleCost]
    budget_bytes: int
    method: ProfileMethod
    device: str
    tensors: _containers.RepeatedCompositeFieldContainer[_transfer_pb2.TensorSpec]
    def __init__(self, config_key: _Optional[str] = ..., base_bytes: _Optional[int] = ..., layer_activation_bytes: _Optional[_Iterable[int]] = ..., modules: _Optional[_Iterable[_Union[ModuleCost, _Mapping]]] = ..., budget_bytes: _Optional[int] = ..., method: _Optional[_Union[ProfileMethod, str]] = ..., device: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_transfer_pb2.TensorSpec, _Mapping]]] = ...) -> None: ...
