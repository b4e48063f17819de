"""Image decoding and validation (genserve.images), on images built in memory with Pillow."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image

from genserve.errors import BadRequest, PayloadTooLarge
from genserve.images import (
    DecodedImage,
    RawImage,
    decode_base64_field,
    decode_image,
    encode_png,
    openai_mask_to_png,
    raw_to_pil,
    to_raw_mask,
    to_raw_rgb,
    transparency_mask,
)

MB = 1024 * 1024
BIG = 10 * MB
PIXELS = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so half of the encoded image cuts into the pixel data."""
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, idat_payload: bytes | None = None) -> bytes:
    """A PNG written by hand: the header is real, the pixel data may be a stub (enough for size checks)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"") if idat_payload is None else idat_payload
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def decoded(image: Image.Image, fmt: str = "PNG") -> DecodedImage:
    return decode_image(encode(image, fmt), "input_image", max_bytes=BIG, max_pixels=PIXELS)


# --- decode_base64_field ----

PAYLOAD = bytes(range(256)) * 4 + b"\x01"  # 1025 bytes: not a multiple of 3, so its base64 ends in padding


def test_bare_base64() -> None:
    text = base64.b64encode(PAYLOAD).decode()
    assert decode_base64_field(text, "input_image", BIG) == PAYLOAD


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "data:;base64,"])
def test_data_uri(prefix: str) -> None:
    text = prefix + base64.b64encode(PAYLOAD).decode()
    assert decode_base64_field(text, "input_image", BIG) == PAYLOAD


def test_data_uri_with_parameters() -> None:
    text = "data:image/jpeg;name=photo.jpg;base64," + base64.b64encode(PAYLOAD).decode()
    assert decode_base64_field(text, "input_image", BIG) == PAYLOAD


def test_line_wrapped_base64_and_surrounding_whitespace() -> None:
    wrapped = base64.encodebytes(PAYLOAD).decode()  # 76-column lines, as the base64 tool writes
    assert "\n" in wrapped.strip()
    assert decode_base64_field("  " + wrapped.replace("\n", "\r\n") + "\n", "input_image", BIG) == PAYLOAD


@pytest.mark.parametrize(("length", "padding"), [(1024, "=="), (1025, "=")])
def test_missing_padding_is_tolerated(length: int, padding: str) -> None:
    payload = PAYLOAD[:length]
    text = base64.b64encode(payload).decode()
    assert text.endswith(padding) and not text.endswith(padding + "=")
    assert decode_base64_field(text.rstrip("="), "input_image", BIG) == payload


@pytest.mark.parametrize("value", ["!!!", "abc$def", "data:image/png;base64,!!!!", "héllo"])
def test_not_base64_is_a_bad_request_naming_the_field(value: str) -> None:
    with pytest.raises(BadRequest, match="mask_image") as info:
        decode_base64_field(value, "mask_image", BIG)
    assert "base64" in info.value.message
    assert info.value.status_code == 400


def test_data_uri_with_non_image_media_type_is_rejected() -> None:
    text = "data:text/plain;base64," + base64.b64encode(PAYLOAD).decode()
    with pytest.raises(BadRequest, match="text/plain") as info:
        decode_base64_field(text, "input_image", BIG)
    assert "input_image" in info.value.message


def test_data_uri_that_is_not_base64_encoded_is_rejected() -> None:
    with pytest.raises(BadRequest, match=";base64,"):
        decode_base64_field("data:image/png,rawbytes", "input_image", BIG)


@pytest.mark.parametrize("value", ["", "   \n", "data:image/png;base64,"])
def test_empty_value_is_rejected(value: str) -> None:
    with pytest.raises(BadRequest, match="control_image is empty"):
        decode_base64_field(value, "control_image", BIG)


def test_estimated_size_over_limit_is_413_before_decoding() -> None:
    # Not valid base64 at all: a 413 (not a 400) shows the size was refused before any decoding was tried.
    with pytest.raises(PayloadTooLarge, match="input_image") as info:
        decode_base64_field("!" * 4000, "input_image", 1000)
    assert info.value.status_code == 413


def test_exact_size_limit_is_accepted_and_one_byte_more_is_413() -> None:
    limit = 3000
    at_limit = bytes(limit)
    assert decode_base64_field(base64.b64encode(at_limit).decode(), "input_image", limit) == at_limit
    with pytest.raises(PayloadTooLarge):
        decode_base64_field(base64.b64encode(bytes(limit + 1)).decode(), "input_image", limit)


def test_line_wrapped_base64_at_the_limit_is_accepted() -> None:
    limit = 3000
    at_limit = bytes(limit)
    wrapped = base64.encodebytes(at_limit).decode()  # what `base64 image.png` prints by default
    assert decode_base64_field(wrapped, "input_image", limit) == at_limit


# --- decode_image ----


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 90})])
def test_supported_formats_decode(fmt: str, params: dict[str, object]) -> None:
    data = encode(noisy_rgb(40, 24), fmt, **params)
    result = decode_image(data, "input_image", max_bytes=BIG, max_pixels=PIXELS)
    assert result.format == fmt
    assert result.field == "input_image"
    assert result.image.size == (40, 24)
    assert len(result.image.tobytes()) == 40 * 24 * 3  # fully loaded


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_unsupported(fmt: str) -> None:
    data = encode(Image.new("RGB", (8, 8), "red"), fmt)
    with pytest.raises(BadRequest, match=f"input_image has unsupported format {fmt}"):
        decode_image(data, "input_image", max_bytes=BIG, max_pixels=PIXELS)


def test_random_bytes_are_not_a_decodable_image() -> None:
    data = random.Random(7).randbytes(2000)
    with pytest.raises(BadRequest, match="input_image is not a decodable image"):
        decode_image(data, "input_image", max_bytes=BIG, max_pixels=PIXELS)


def test_empty_bytes_are_rejected() -> None:
    with pytest.raises(BadRequest, match="input_image is empty"):
        decode_image(b"", "input_image", max_bytes=BIG, max_pixels=PIXELS)


def test_truncated_png_is_reported_as_truncated_or_corrupt() -> None:
    data = encode(noisy_rgb(128, 128))
    half = data[: len(data) // 2]
    with pytest.raises(BadRequest, match="truncated or corrupt") as info:
        decode_image(half, "input_image", max_bytes=BIG, max_pixels=PIXELS)
    assert "input_image" in info.value.message


def test_encoded_size_over_limit_is_413() -> None:
    data = encode(noisy_rgb(64, 64))
    assert decode_image(data, "input_image", max_bytes=len(data), max_pixels=PIXELS).image.size == (64, 64)
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, "input_image", max_bytes=len(data) - 1, max_pixels=PIXELS)
    assert info.value.status_code == 413


def test_handmade_png_helper_builds_a_valid_png() -> None:
    # 2x1 RGB: per row, filter byte 0 then the pixels. Shows the bomb tests below fail on size, not syntax.
    pixels = b"\x00" + b"\xff\x00\x00" + b"\x00\x00\xff"
    result = decode_image(handmade_png(2, 1, zlib.compress(pixels)), "x", max_bytes=BIG, max_pixels=PIXELS)
    assert result.format == "PNG"
    assert result.image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert result.image.convert("RGB").getpixel((1, 0)) == (0, 0, 255)


def test_decompression_bomb_header_is_refused() -> None:
    data = handmade_png(100_000, 100_000)
    assert len(data) < 100
    with pytest.raises(BadRequest, match="pixels") as info:
        decode_image(data, "input_image", max_bytes=BIG, max_pixels=PIXELS)
    assert "input_image" in info.value.message


def test_header_over_configured_pixel_limit_is_refused_before_decoding() -> None:
    data = handmade_png(5000, 5000)  # no real pixel data: decoding would fail, so the refusal comes from the header
    with pytest.raises(BadRequest, match="5000x5000") as info:
        decode_image(data, "input_image", max_bytes=BIG, max_pixels=4096 * 4096)
    assert str(4096 * 4096) in info.value.message


def test_pixel_limit_boundary() -> None:
    data = encode(noisy_rgb(10, 10))
    assert decode_image(data, "input_image", max_bytes=BIG, max_pixels=100).image.size == (10, 10)
    with pytest.raises(BadRequest, match="10x10"):
        decode_image(data, "input_image", max_bytes=BIG, max_pixels=99)


# --- to_raw_rgb / to_raw_mask / raw_to_pil / encode_png ----


def test_to_raw_rgb_keeps_pixels_at_the_same_size() -> None:
    image = noisy_rgb(16, 8)
    raw = to_raw_rgb(decoded(image), 16, 8)
    assert (raw.width, raw.height, raw.mode) == (16, 8, "RGB")
    assert raw.data == image.tobytes()


def test_to_raw_rgb_flattens_transparency_onto_white() -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (0, 0, 255, 255))  # one opaque blue
    image.putpixel((2, 0), (0, 0, 0, 128))  # one half-transparent black
    raw = to_raw_rgb(decoded(image), 4, 2)
    flat = raw_to_pil(raw)
    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(channel - 127) <= 1 for channel in flat.getpixel((2, 0)))


def test_to_raw_rgb_flattens_palette_transparency_and_grey_alpha() -> None:
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette.putpixel((1, 1), 1)
    flat = raw_to_pil(to_raw_rgb(decoded_with(palette, transparency=0), 2, 2))
    assert flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((1, 1)) == (0, 255, 0)

    grey_alpha = Image.new("LA", (2, 2), (0, 0))
    assert raw_to_pil(to_raw_rgb(decoded(grey_alpha), 2, 2)).getpixel((0, 0)) == (255, 255, 255)


def decoded_with(image: Image.Image, **params: object) -> DecodedImage:
    return decode_image(encode(image, "PNG", **params), "input_image", max_bytes=BIG, max_pixels=PIXELS)


def test_to_raw_rgb_flattens_rgb_colour_key_transparency() -> None:
    image = Image.new("RGB", (2, 2), (0, 0, 0))
    flat = raw_to_pil(to_raw_rgb(decoded_with(image, transparency=(0, 0, 0)), 2, 2))
    assert flat.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_png_keeps_its_tone() -> None:
    image = Image.new("I;16", (2, 2), 32768)  # mid grey in 16 bits, e.g. a depth map
    rgb = raw_to_pil(to_raw_rgb(decoded(image), 2, 2)).getpixel((0, 0))
    assert all(abs(channel - 128) <= 2 for channel in rgb)


def test_to_raw_rgb_converts_grey_to_rgb() -> None:
    raw = to_raw_rgb(decoded(Image.new("L", (3, 3), 77)), 3, 3)
    assert raw.mode == "RGB"
    assert raw.data == bytes([77, 77, 77]) * 9


@pytest.mark.parametrize(("width", "height"), [(32, 16), (64, 64), (16, 48)])
def test_to_raw_rgb_resizes_to_the_asked_size(width: int, height: int) -> None:
    raw = to_raw_rgb(decoded(noisy_rgb(40, 24), "JPEG"), width, height)
    assert (raw.width, raw.height, raw.mode) == (width, height, "RGB")
    assert len(raw.data) == width * height * 3


def test_to_raw_rgb_resize_keeps_a_uniform_colour() -> None:
    raw = to_raw_rgb(decoded(Image.new("RGB", (30, 10), (10, 200, 30))), 16, 32)
    assert raw.data == bytes([10, 200, 30]) * (16 * 32)


def test_to_raw_mask_is_grey_and_resized() -> None:
    mask = Image.new("RGB", (20, 10), (0, 0, 0))
    mask.paste((255, 255, 255), (10, 0, 20, 10))  # right half white = repaint
    raw = to_raw_mask(decoded(mask), 32, 16)
    assert (raw.width, raw.height, raw.mode) == (32, 16, "L")
    assert len(raw.data) == 32 * 16
    image = raw_to_pil(raw)
    assert image.getpixel((0, 8)) == 0
    assert image.getpixel((31, 8)) == 255


def test_to_raw_mask_same_size_keeps_values() -> None:
    mask = Image.frombytes("L", (8, 4), bytes(range(0, 256, 8)))
    raw = to_raw_mask(decoded(mask), 8, 4)
    assert raw.data == mask.tobytes()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_raw_to_pil_round_trips(mode: str) -> None:
    channels = 3 if mode == "RGB" else 1
    data = random.Random(3).randbytes(6 * 5 * channels)
    raw = RawImage(width=6, height=5, mode=mode, data=data)  # type: ignore[arg-type]
    image = raw_to_pil(raw)
    assert (image.mode, image.size) == (mode, (6, 5))
    assert image.tobytes() == data


@pytest.mark.parametrize("level", [1, 9])
def test_encode_png_decodes_to_the_same_pixels(level: int) -> None:
    image = noisy_rgb(33, 17, seed=5)
    data = encode_png(image, compress_level=level)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    again = Image.open(io.BytesIO(data))
    assert again.format == "PNG"
    assert (again.mode, again.size) == ("RGB", (33, 17))
    assert again.tobytes() == image.tobytes()


def test_encode_png_output_passes_decode_image() -> None:
    image = noisy_rgb(20, 20, seed=9)
    result = decode_image(encode_png(image), "image", max_bytes=BIG, max_pixels=PIXELS)
    assert result.format == "PNG"
    assert result.image.tobytes() == image.tobytes()


def _holed(mode: str = "RGBA") -> bytes:
    """64x64, opaque but for a fully transparent 16x16 square at (8, 8); a half-transparent pixel at (60, 60)."""
    image = Image.new("RGBA", (64, 64), (10, 200, 30, 255))
    image.paste((0, 0, 0, 0), (8, 8, 24, 24))
    image.putpixel((60, 60), (10, 200, 30, 128))
    return encode(image.convert(mode) if mode != "RGBA" else image)


def test_the_transparent_pixels_of_an_image_become_the_repaint_area() -> None:
    mask = transparency_mask(_holed(), "image", max_bytes=BIG, max_pixels=PIXELS)
    assert mask is not None
    grey = Image.open(io.BytesIO(mask))
    assert grey.mode == "L" and grey.size == (64, 64)
    assert grey.getpixel((8, 8)) == 255 and grey.getpixel((23, 23)) == 255  # fully transparent: repaint
    assert grey.getpixel((24, 24)) == 0 and grey.getpixel((60, 60)) == 0  # opaque or half: keep
    assert grey.histogram()[255] == 16 * 16 and grey.histogram()[0] == 64 * 64 - 16 * 16
    # the same area as an OpenAI mask file with those pixels transparent
    assert openai_mask_to_png(_holed(), "mask", max_bytes=BIG, max_pixels=PIXELS) == mask


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (32, 32), (1, 2, 3)),  # no alpha
        Image.new("RGBA", (32, 32), (1, 2, 3, 255)),  # alpha, all opaque
        Image.new("RGBA", (32, 32), (1, 2, 3, 100)),  # half transparent, nothing fully transparent
    ],
)
def test_an_image_without_fully_transparent_pixels_gives_no_mask(image: Image.Image) -> None:
    assert transparency_mask(encode(image), "image", max_bytes=BIG, max_pixels=PIXELS) is None
