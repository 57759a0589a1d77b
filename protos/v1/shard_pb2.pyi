from loraplex.protos.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardGenerateRequest(_message.Message):
    __slots__ = ("request", "adapter")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.GenerateRequest
    adapter: _common_pb2.Adapter
    def __init__(self, request: _Optional[_Union[_common_pb2.GenerateRequest, _Mapping]] = ..., adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ...) -> None: ...

class ShardStreamRequest(_message.Message):
    __slots__ = ("actions",)
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[ShardStreamAction]
    def __init__(self, actions: _Optional[_Iterable[_Union[ShardStreamAction, _Mapping]]] = ...) -> None: ...

class ShardStreamAction(_message.Message):
    __slots__ = ("id", "start", "cancel", "timeout_s", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: ShardGenerateRequest
    cancel: bool
    timeout_s: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., start: _Optional[_Union[ShardGenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardStreamEvent(_message.Message):
    __slots__ = ("id", "chunk", "end", "status_code", "status_message", "outstanding_requests")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    chunk: _common_pb2.GenerateStreamResponse
    end: bool
    status_code: int
    status_message: str
    outstanding_requests: int
    def __init__(self, id: _Optional[int] = ..., chunk: _Optional[_Union[_common_pb2.GenerateStreamResponse, _Mapping]] = ..., end: _Optional[bool] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., outstanding_requests: _Optional[int] = ...) -> None: ...

class ShardStreamResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ShardStreamEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ShardStreamEvent, _Mapping]]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter", "tier")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.Adapter
    tier: _common_pb2.Tier
    def __init__(self, adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("tier", "load_ms")
    TIER_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    tier: _common_pb2.Tier
    load_ms: float
    def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., load_ms: _Optional[float] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard_id", "address", "base_model", "max_context", "running_requests", "waiting_requests", "queued_tokens", "max_running_requests", "kv_blocks_used", "kv_blocks_free", "max_gpu_adapters", "max_cpu_adapters", "adapters")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CPU_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    address: str
    base_model: str
    max_context: int
    running_requests: int
    waiting_requests: int
    queued_tokens: int
    max_running_requests: int
    kv_blocks_used: int
    kv_blocks_free: int
    max_gpu_adapters: int
    max_cpu_adapters: int
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterPlacement]
    def __init__(self, shard_id: _Optional[str] = ..., address: _Optional[str] = ..., base_model: _Optional[str] = ..., max_context: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., max_gpu_adapters: _Optional[int] = ..., max_cpu_adapters: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterPlacement, _Mapping]]] = ...) -> None: ...
