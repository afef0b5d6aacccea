"""The tensor codec: round trips (property-based), zero-copy decoding, and every validation error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wmpo.common import tensors
from wmpo.common.tensors import Array, TensorError, decode_image, encode_image, from_proto, to_proto
from wmpo.v1 import tensor_pb2

WIRE_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32,
               np.float16, np.float32, np.float64, np.bool_]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(WIRE_DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_round_trip_preserves_dtype_shape_and_values(array: Array) -> None:
    msg = tensor_pb2.Tensor.FromString(to_proto(array).SerializeToString())
    back = from_proto(msg, dtype=array.dtype, shape=array.shape)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(dtype=hnp.floating_dtypes(sizes=(32, 64), endianness=">"), shape=hnp.array_shapes(max_dims=3)))
def test_big_endian_and_non_contiguous_inputs_are_sent_little_endian(array: Array) -> None:
    strided = np.asarray(array)[..., ::-1]
    msg = to_proto(strided)
    back = from_proto(msg, require_finite=False)
    np.testing.assert_array_equal(back, strided)
    assert back.dtype.byteorder in ("<", "=")


def test_decode_is_zero_copy_and_read_only() -> None:
    msg = to_proto(np.arange(12, dtype=np.float32).reshape(3, 4))
    array = from_proto(msg)
    assert not array.flags.owndata
    assert not array.flags.writeable
    base: object = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, bytes)


def test_wildcard_shape_matches_any_size() -> None:
    msg = to_proto(np.zeros((5, 7), np.float32))
    assert from_proto(msg, shape=(None, 7)).shape == (5, 7)


@pytest.mark.parametrize(
    ("build", "kwargs", "expected"),
    [
        (
            lambda: to_proto(np.zeros(3, np.int64)),
            {"dtype": np.float32},
            "proprio: expected dtype float32, got int64",
        ),
        (
            lambda: to_proto(np.zeros((6,), np.float32)),
            {"shape": (7,)},
            "proprio: expected shape (7,), got (6,)",
        ),
        (
            lambda: to_proto(np.zeros((2, 3), np.float32)),
            {"shape": (None, 4)},
            "expected shape (*, 4), got (2, 3)",
        ),
        (
            lambda: tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20),
            {},
            "data has 20 bytes but shape (2, 3) of float32 needs 24",
        ),
        (
            lambda: tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"),
            {},
            "dtype DTYPE_UNSPECIFIED is not a valid element type",
        ),
        (
            lambda: tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"),  # type: ignore[arg-type]
            {},
            "dtype 99 is not a valid element type",
        ),
        (
            lambda: tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[-1, 2]),
            {},
            "has a negative dimension",
        ),
        (
            lambda: to_proto(np.array([1.0, np.nan, np.inf], np.float32)),
            {},
            "2 non-finite value(s), first nan at index (1,)",
        ),
        (
            lambda: tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], data=b"\x00\x07"),
            {},
            "bool data must be bytes 0 or 1",
        ),
    ],
)
def test_invalid_tensors_get_precise_messages(build, kwargs, expected) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TensorError) as info:
        from_proto(build(), field="proprio", **kwargs)
    assert expected in str(info.value)
    assert str(info.value).startswith("proprio: ")
    assert not info.value.too_large


def test_size_limit_is_checked_before_touching_the_data() -> None:
    # A header that claims 8 TB with no data: refused as too large, never allocated.
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 20, 1 << 20])
    with pytest.raises(TensorError, match="exceeds the limit of 1,024 bytes") as info:
        from_proto(huge, field="frames", max_bytes=1024)
    assert info.value.too_large


def test_non_finite_values_can_be_allowed() -> None:
    msg = to_proto(np.array([np.nan], np.float32))
    assert np.isnan(from_proto(msg, require_finite=False)[0])


def test_unsupported_dtype_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="complex64 cannot be sent"):
        to_proto(np.zeros(2, np.complex64))


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3]))),
    st.sampled_from(["raw", "png"]),
)
def test_lossless_images_round_trip(image: Array, encoding: tensors.ImageEncodingName) -> None:
    msg = tensor_pb2.Image.FromString(encode_image(image, encoding).SerializeToString())
    back = decode_image(msg, height=image.shape[0], width=image.shape[1], channels=image.shape[2])
    np.testing.assert_array_equal(back, image)


def test_jpeg_is_close_and_smaller() -> None:
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    msg = encode_image(image, "jpeg", jpeg_quality=95)
    assert len(msg.data) < image.nbytes
    back = decode_image(msg, height=64, width=64, channels=3)
    assert np.abs(back.astype(int) - image.astype(int)).mean() < 3


def test_image_errors() -> None:
    raw = encode_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TensorError, match=r"camera\.main: expected shape \(64, 64, 3\), got \(4, 4, 3\)"):
        decode_image(raw, field="camera.main", height=64, width=64, channels=3)
    truncated = tensor_pb2.Image(height=4, width=4, channels=3, data=b"\0" * 10)
    with pytest.raises(TensorError, match="raw data has 10 bytes but 4x4x3 needs 48"):
        decode_image(truncated)
    corrupt = tensor_pb2.Image(encoding=tensor_pb2.IMAGE_ENCODING_PNG, data=b"not a png")
    with pytest.raises(TensorError, match="cannot decode PNG image"):
        decode_image(corrupt)
    big_png = encode_image(np.zeros((200, 200, 3), np.uint8), "png")
    with pytest.raises(TensorError, match="exceeds the limit") as info:
        decode_image(big_png, max_bytes=1000)
    assert info.value.too_large
    with pytest.raises(TensorError, match="expected dtype uint8, got float32"):
        encode_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(TensorError, match="channels must be 1 or 3, got 4"):
        decode_image(tensor_pb2.Image(height=1, width=1, channels=4, data=b"\0" * 4))
