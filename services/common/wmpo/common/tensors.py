"""The tensor codec: numpy arrays and camera images to and from `wmpo.v1` protobuf messages.

Decoding is zero-copy (`numpy.frombuffer` over the message's bytes; the result is read-only) and
validates everything a remote peer controls: dtype, shape, byte length, a size limit, and finite
values. Every failure raises `TensorError`, whose message names the field and says what was
expected; services turn it into INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when too large).

Only numpy (and the generated protobuf classes) are imported here: robots use this module.
Pillow is imported on demand, for JPEG/PNG images only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from wmpo.v1 import tensor_pb2

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default limit on one decoded tensor or image (64 MiB)."""

_DTYPES: dict[int, np.dtype[np.generic]] = {
    tensor_pb2.DTYPE_UINT8: np.dtype("<u1"),
    tensor_pb2.DTYPE_INT8: np.dtype("<i1"),
    tensor_pb2.DTYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_UINT16: np.dtype("<u2"),
    tensor_pb2.DTYPE_UINT32: np.dtype("<u4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_BOOL: np.dtype("?"),
}
_ENUM_OF: dict[str, int] = {dt.str.lstrip("<|="): code for code, dt in _DTYPES.items()}

Array = npt.NDArray[Any]
"""Any numpy array (what decoding returns)."""
DTypeLike = npt.DTypeLike
ShapeSpec = Sequence[int | None]
"""An expected shape: one entry per dimension, `None` for "any size"."""

ImageEncodingName = Literal["raw", "jpeg", "png"]
_ENCODINGS: dict[str, int] = {
    "raw": tensor_pb2.IMAGE_ENCODING_RAW,
    "jpeg": tensor_pb2.IMAGE_ENCODING_JPEG,
    "png": tensor_pb2.IMAGE_ENCODING_PNG,
}


class TensorError(ValueError):
    """A tensor or image failed validation.

    `field` names the offending message field (e.g. ``observation.proprio``); `too_large` is true
    when the only problem is the size limit (services answer RESOURCE_EXHAUSTED for it).
    """

    def __init__(self, field: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.too_large = too_large


def dtype_name(dtype: DTypeLike) -> str:
    """The short name of a dtype as used in error messages (``float32``, ``uint8``, ...)."""
    return str(np.dtype(dtype).name)


def proto_dtype(dtype: DTypeLike) -> int:
    """The `wmpo.v1.DType` value of a numpy dtype; `TypeError` for dtypes the wire cannot carry."""
    key = np.dtype(dtype).str.lstrip("<>|=")
    if key not in _ENUM_OF:
        supported = ", ".join(sorted(dtype_name(d) for d in _DTYPES.values()))
        raise TypeError(f"dtype {dtype_name(dtype)} cannot be sent; supported: {supported}")
    return _ENUM_OF[key]


def to_proto(array: npt.ArrayLike, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode an array as a `Tensor` (little-endian, C order). Fills `out` when given."""
    arr = np.asarray(array)
    code = proto_dtype(arr.dtype)
    wire = np.asarray(arr, dtype=_DTYPES[code], order="C")  # keeps 0-d arrays 0-d
    msg = out if out is not None else tensor_pb2.Tensor()
    msg.dtype = code  # type: ignore[assignment]
    del msg.shape[:]
    msg.shape.extend(int(d) for d in wire.shape)
    msg.data = wire.tobytes()
    return msg


def _format_shape(shape: Sequence[int | None]) -> str:
    dims = ["*" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def check_shape(actual: Sequence[int], expected: ShapeSpec, field: str) -> None:
    """Raise `TensorError` unless `actual` matches `expected` (`None` matches any size)."""
    ok = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))
    if not ok:
        raise TensorError(field, f"expected shape {_format_shape(expected)}, got {_format_shape(actual)}")


def check_finite(array: Array, field: str) -> None:
    """Raise `TensorError` if a floating array holds NaN or ±inf (says how many and where)."""
    if array.dtype.kind != "f" or array.size == 0:
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    first = tuple(int(i) for i in bad[0])
    value = array[first]
    raise TensorError(field, f"{len(bad)} non-finite value(s), first {value} at index {first}")


def from_proto(
    msg: tensor_pb2.Tensor,
    *,
    field: str = "tensor",
    dtype: DTypeLike | None = None,
    shape: ShapeSpec | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    require_finite: bool = True,
) -> Array:
    """Decode a `Tensor` into a read-only array that shares the message's bytes (no copy).

    Checks, in order: known dtype, the expected `dtype`, non-negative dims, the expected `shape`,
    the size limit, the byte length, and (for floats, unless disabled) finite values.
    """
    if msg.dtype not in _DTYPES:
        name = tensor_pb2.DType.Name(msg.dtype) if msg.dtype in tensor_pb2.DType.values() else msg.dtype
        raise TensorError(field, f"dtype {name} is not a valid element type")
    wire = _DTYPES[msg.dtype]
    if dtype is not None and wire != np.dtype(dtype).newbyteorder("<"):
        raise TensorError(field, f"expected dtype {dtype_name(dtype)}, got {dtype_name(wire)}")
    dims = [int(d) for d in msg.shape]
    if any(d < 0 for d in dims):
        raise TensorError(field, f"shape {_format_shape(dims)} has a negative dimension")
    if shape is not None:
        check_shape(dims, shape, field)
    need = math.prod(dims) * wire.itemsize
    if need > max_bytes:
        raise TensorError(field, f"{need:,} bytes exceeds the limit of {max_bytes:,} bytes", too_large=True)
    data = msg.data
    if len(data) != need:
        raise TensorError(
            field,
            f"data has {len(data):,} bytes but shape {_format_shape(dims)} of {dtype_name(wire)} needs {need:,}",
        )
    array = np.frombuffer(data, dtype=wire).reshape(dims)
    if wire.kind == "b" and array.size and not np.isin(array.view(np.uint8), (0, 1)).all():
        raise TensorError(field, "bool data must be bytes 0 or 1")
    if require_finite:
        check_finite(array, field)
    return array


def encode_image(
    image: npt.ArrayLike, encoding: ImageEncodingName = "raw", *, jpeg_quality: int = 90
) -> tensor_pb2.Image:
    """Encode a uint8 HWC (or HW) image as an `Image`, raw or JPEG/PNG (these need Pillow)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TensorError("image", f"expected dtype uint8, got {dtype_name(arr.dtype)}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise TensorError("image", f"expected shape (H, W, 1|3), got {_format_shape(arr.shape)}")
    if encoding not in _ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; use one of {sorted(_ENCODINGS)}")
    height, width, channels = (int(d) for d in arr.shape)
    msg = tensor_pb2.Image(
        encoding=_ENCODINGS[encoding],  # type: ignore[arg-type]
        height=height,
        width=width,
        channels=channels,
    )
    if encoding == "raw":
        msg.data = np.ascontiguousarray(arr).tobytes()
        return msg
    pil = _pillow()
    buf = io.BytesIO()
    pil_image = pil.fromarray(arr[:, :, 0] if channels == 1 else arr)
    if encoding == "jpeg":
        pil_image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        pil_image.save(buf, format="PNG")
    msg.data = buf.getvalue()
    return msg


def decode_image(
    msg: tensor_pb2.Image,
    *,
    field: str = "image",
    height: int | None = None,
    width: int | None = None,
    channels: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Array:
    """Decode an `Image` into a uint8 HWC array and check its size against what is expected.

    RAW images are zero-copy (read-only); JPEG/PNG are decoded with Pillow, refusing images whose
    declared size exceeds `max_bytes` before any pixel is decoded.
    """
    declared_c = msg.channels or 3
    if declared_c not in (1, 3):
        raise TensorError(field, f"channels must be 1 or 3, got {declared_c}")
    if msg.encoding == tensor_pb2.IMAGE_ENCODING_RAW:
        if msg.height == 0 or msg.width == 0:
            raise TensorError(field, "raw image needs height and width")
        need = msg.height * msg.width * declared_c
        if need > max_bytes:
            raise TensorError(field, f"{need:,} bytes exceeds the limit of {max_bytes:,} bytes", too_large=True)
        data = msg.data
        if len(data) != need:
            raise TensorError(
                field,
                f"raw data has {len(data):,} bytes but {msg.height}x{msg.width}x{declared_c} needs {need:,}",
            )
        array = np.frombuffer(data, dtype=np.uint8).reshape(msg.height, msg.width, declared_c)
    elif msg.encoding in (tensor_pb2.IMAGE_ENCODING_JPEG, tensor_pb2.IMAGE_ENCODING_PNG):
        array = _decode_compressed(msg, field, declared_c, max_bytes)
    else:
        raise TensorError(field, f"unknown image encoding {msg.encoding}")
    expected = (height, width, channels)
    if any(e is not None for e in expected):
        check_shape(array.shape, expected, field)
    return array


def _decode_compressed(msg: tensor_pb2.Image, field: str, channels: int, max_bytes: int) -> Array:
    pil = _pillow()
    kind = "JPEG" if msg.encoding == tensor_pb2.IMAGE_ENCODING_JPEG else "PNG"
    try:
        img = pil.open(io.BytesIO(msg.data), formats=[kind])
        w, h = img.size
        if w * h * channels > max_bytes:
            raise TensorError(field, f"{w}x{h} image exceeds the limit of {max_bytes:,} bytes", too_large=True)
        img = img.convert("L" if channels == 1 else "RGB")
        img.load()
    except TensorError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise TensorError(field, f"cannot decode {kind} image: {exc}") from exc
    if (msg.height and msg.height != h) or (msg.width and msg.width != w):
        raise TensorError(field, f"decoded {kind} is {h}x{w} but the message says {msg.height}x{msg.width}")
    array = np.asarray(img, dtype=np.uint8)
    return array.reshape(h, w, channels)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # robots may run without Pillow
        raise RuntimeError("JPEG/PNG images need Pillow (`pip install pillow`); raw images do not") from exc
    return Image
