from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Propagation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPAGATION_SERVER_DEFAULT: _ClassVar[Propagation]
    PROPAGATION_ON: _ClassVar[Propagation]
    PROPAGATION_OFF: _ClassVar[Propagation]
    PROPAGATION_AUTO: _ClassVar[Propagation]
PROPAGATION_SERVER_DEFAULT: Propagation
PROPAGATION_ON: Propagation
PROPAGATION_OFF: Propagation
PROPAGATION_AUTO: Propagation

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "sha256", "input_size", "is_default", "edge_snap")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    EDGE_SNAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    input_size: int
    is_default: bool
    edge_snap: bool
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., input_size: _Optional[int] = ..., is_default: _Optional[bool] = ..., edge_snap: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_pixels", "max_message_bytes", "max_points", "session_idle_seconds", "cache_bytes", "max_sessions", "max_concurrent_rpcs", "max_concurrent_encodes")
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_ENCODES_FIELD_NUMBER: _ClassVar[int]
    max_pixels: int
    max_message_bytes: int
    max_points: int
    session_idle_seconds: float
    cache_bytes: int
    max_sessions: int
    max_concurrent_rpcs: int
    max_concurrent_encodes: int
    def __init__(self, max_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_points: _Optional[int] = ..., session_idle_seconds: _Optional[float] = ..., cache_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., max_concurrent_encodes: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "models", "default_model", "providers", "limits", "token_required", "slides_enabled", "open_sessions", "cache_used_bytes", "cache_entries", "propagation_default", "session_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SLIDES_ENABLED_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROPAGATION_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    token_required: bool
    slides_enabled: bool
    open_sessions: int
    cache_used_bytes: int
    cache_entries: int
    propagation_default: Propagation
    session_bytes: int
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., token_required: _Optional[bool] = ..., slides_enabled: _Optional[bool] = ..., open_sessions: _Optional[int] = ..., cache_used_bytes: _Optional[int] = ..., cache_entries: _Optional[int] = ..., propagation_default: _Optional[_Union[Propagation, str]] = ..., session_bytes: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("origin_x", "origin_y", "downsample")
    ORIGIN_X_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_Y_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    origin_x: float
    origin_y: float
    downsample: float
    def __init__(self, origin_x: _Optional[float] = ..., origin_y: _Optional[float] = ..., downsample: _Optional[float] = ...) -> None: ...

class SlideRegion(_message.Message):
    __slots__ = ("slide_path", "x", "y", "width", "height", "downsample")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    x: float
    y: float
    width: float
    height: float
    downsample: float
    def __init__(self, slide_path: _Optional[str] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ..., downsample: _Optional[float] = ...) -> None: ...

class OpenImageRequest(_message.Message):
    __slots__ = ("model", "encoded_image", "slide_region", "frame")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SLIDE_REGION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    encoded_image: bytes
    slide_region: SlideRegion
    frame: Frame
    def __init__(self, model: _Optional[str] = ..., encoded_image: _Optional[bytes] = ..., slide_region: _Optional[_Union[SlideRegion, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class OpenImageResponse(_message.Message):
    __slots__ = ("session_id", "width", "height", "model", "cache_hit", "encode_seconds", "frame", "model_sha256", "decode_image_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DECODE_IMAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    width: int
    height: int
    model: str
    cache_hit: bool
    encode_seconds: float
    frame: Frame
    model_sha256: str
    decode_image_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., model: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., encode_seconds: _Optional[float] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., model_sha256: _Optional[str] = ..., decode_image_seconds: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y", "positive")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    positive: bool
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., positive: _Optional[bool] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("exterior", "holes")
    EXTERIOR_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    exterior: _containers.RepeatedScalarFieldContainer[float]
    holes: _containers.RepeatedCompositeFieldContainer[Ring]
    def __init__(self, exterior: _Optional[_Iterable[float]] = ..., holes: _Optional[_Iterable[_Union[Ring, _Mapping]]] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("xy",)
    XY_FIELD_NUMBER: _ClassVar[int]
    xy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, xy: _Optional[_Iterable[float]] = ...) -> None: ...

class ClickRequest(_message.Message):
    __slots__ = ("session_id", "points", "box", "want_mask_png", "simplify_tolerance", "min_area", "mask_prompt_png", "mask_prompt_polygons", "propagation")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    WANT_MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    SIMPLIFY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FIELD_NUMBER: _ClassVar[int]
    MASK_PROMPT_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_PROMPT_POLYGONS_FIELD_NUMBER: _ClassVar[int]
    PROPAGATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    points: _containers.RepeatedCompositeFieldContainer[Point]
    box: Box
    want_mask_png: bool
    simplify_tolerance: float
    min_area: float
    mask_prompt_png: bytes
    mask_prompt_polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    propagation: Propagation
    def __init__(self, session_id: _Optional[str] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., want_mask_png: _Optional[bool] = ..., simplify_tolerance: _Optional[float] = ..., min_area: _Optional[float] = ..., mask_prompt_png: _Optional[bytes] = ..., mask_prompt_polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., propagation: _Optional[_Union[Propagation, str]] = ...) -> None: ...

class ClickResponse(_message.Message):
    __slots__ = ("polygons", "mask_png", "predicted_iou", "decode_seconds", "num_points", "decoded_steps", "mask_pixels", "width", "height", "propagated")
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_IOU_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_POINTS_FIELD_NUMBER: _ClassVar[int]
    DECODED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MASK_PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROPAGATED_FIELD_NUMBER: _ClassVar[int]
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    mask_png: bytes
    predicted_iou: float
    decode_seconds: float
    num_points: int
    decoded_steps: int
    mask_pixels: int
    width: int
    height: int
    propagated: bool
    def __init__(self, polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., mask_png: _Optional[bytes] = ..., predicted_iou: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., num_points: _Optional[int] = ..., decoded_steps: _Optional[int] = ..., mask_pixels: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., propagated: _Optional[bool] = ...) -> None: ...

class CloseImageRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseImageResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...
