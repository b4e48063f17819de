"""Image decoding and validation in the API process (always called off the event loop, in a worker thread).

Every image a client sends passes through here before a job is queued, so a bad image is a 400/413 for that
request and never reaches a worker: size cap on the encoded bytes, base64 and data-URI parsing, an allow-list of
formats, a pixel-count cap read from the header *before* decoding (decompression bombs), and a full decode (to catch
truncated or corrupt files).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from genserve.errors import BadRequest, PayloadTooLarge
from genserve.messages import ImageFile

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_WHITESPACE_BYTES = b" \t\r\n\x0b\x0c"

# Pillow's own bomb check warns (or raises) at its default limit; ours is stricter and comes first, so keep
# Pillow quiet rather than letting a warning escape into logs as noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class RawImage:
    """Decoded, validated pixels in the API process, already resized to the job's output size."""

    width: int  # pixels
    height: int  # pixels
    mode: Literal["RGB", "L"]  # PIL mode: RGB for pictures, L (8-bit grey) for masks
    data: bytes  # row-major pixel bytes, width * height * channels long


@dataclass(frozen=True)
class DecodedImage:
    field: str  # request field it came from, for error messages
    image: Image.Image  # fully loaded
    format: str  # PNG, JPEG or WEBP


def _megabytes(n: int | float) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def decode_base64_field(value: str, field: str, max_bytes: int) -> bytes:
    """Bare base64 or a ``data:image/...;base64,`` URI → bytes. 413 over max_bytes, 400 if not base64."""
    text = value.strip()
    match = _DATA_URI.match(text)
    if match:
        if not match.group("b64"):
            raise BadRequest(f"{field}: data URI must be base64-encoded (';base64,')")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise BadRequest(f"{field}: data URI has media type {mime!r}, expected image/*")
        text = text[match.end() :]
    # Coarse check first: even wrapped at 64 columns, base64 carries more than 3 bytes per 4.1 characters, so
    # anything this long is over the limit and need not be copied and cleaned.
    if len(text) * 3 // 4 > (max_bytes + 3) * 1.05:
        raise PayloadTooLarge(f"{field} is larger than the {_megabytes(max_bytes)} limit per image")
    # Clients may wrap lines. bytes.translate drops whitespace ~15x faster than a regex on megabytes of base64.
    raw = text.encode("ascii", errors="replace").translate(None, _WHITESPACE_BYTES)
    if not raw:
        raise BadRequest(f"{field} is empty")
    # Every 4 base64 characters carry 3 bytes: refuse before spending time and memory on decoding.
    if len(raw) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(f"{field} is larger than the {_megabytes(max_bytes)} limit per image")
    if len(raw) % 4:
        raw += b"=" * (-len(raw) % 4)  # tolerate stripped padding
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is not valid base64 (nor a data:image/...;base64, URI)") from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field} is larger than the {_megabytes(max_bytes)} limit per image")
    return data


def decode_image(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Encoded bytes → a fully loaded PIL image, or a 400/413 that says what is wrong."""
    if not data:
        raise BadRequest(f"{field} is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{field} is {_megabytes(len(data))}, larger than the {_megabytes(max_bytes)} limit per image"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadRequest(f"{field} declares more pixels than the limit of {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(
            f"{field} is not a decodable image; send {', '.join(SUPPORTED_FORMATS)} (raw upload or base64)"
        ) from None
    fmt = (image.format or "unknown").upper()
    if fmt not in SUPPORTED_FORMATS:
        raise BadRequest(f"{field} has unsupported format {fmt}; use one of {', '.join(SUPPORTED_FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequest(f"{field} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadRequest(f"{field} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
    except Image.DecompressionBombError:
        raise BadRequest(f"{field} declares more pixels than the limit of {max_pixels}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequest(f"{field} is truncated or corrupt ({fmt}: {exc})") from None
    # Phone photos store their rotation in EXIF; the client means the picture as it is shown.
    upright: Image.Image = ImageOps.exif_transpose(image) or image
    return DecodedImage(field=field, image=upright, format=fmt)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale (depth maps are often 16-bit PNG) scaled to 8 bits instead of clipped at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode == "I":
        high = image.getextrema()[1]
        scale = 1 / 256 if isinstance(high, int) and high > 255 else 1
        return image.point(lambda value: value * scale).convert("L")
    if image.mode == "F":
        return image.convert("L")
    return image


def to_raw_rgb(decoded: DecodedImage, width: int, height: int) -> RawImage:
    """A picture, flattened onto white if it has transparency, resized to the output size."""
    image = _to_8bit(decoded.image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return RawImage(width=width, height=height, mode="RGB", data=image.tobytes())


def to_raw_mask(decoded: DecodedImage, width: int, height: int) -> RawImage:
    """A mask as 8-bit grey (white = repaint), resized to the output size."""
    image = _to_8bit(decoded.image).convert("L")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return RawImage(width=width, height=height, mode="L", data=image.tobytes())


def raw_to_pil(raw: RawImage) -> Image.Image:
    return Image.frombytes(raw.mode, (raw.width, raw.height), raw.data)


def image_file_to_pil(image: ImageFile) -> Image.Image:
    """Worker side: the pixels the API process wrote for a job (see ResultStore.write_inputs)."""
    with open(image.path, "rb") as file:
        return Image.frombytes(image.mode, (image.width, image.height), file.read())


PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and image viewers read
EXIF_USER_COMMENT = 0x9286  # where JPEG and WEBP keep the same text
EXIF_IFD = 0x8769


def encode_png(image: Image.Image, compress_level: int = 1, parameters: str = "") -> bytes:
    """PNG at a fast level (on noisy 1024² output, level 6 costs ~4× level 1 for a few % of size), with the
    generation parameters as a text chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters:
        info = PngInfo()
        info.add_itxt(PARAMETERS_KEY, parameters)  # iTXt: UTF-8, any prompt
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level, pnginfo=info)
    return buffer.getvalue()


def _user_comment(text: str) -> bytes:
    """EXIF UserComment: an 8-byte character code, then the text (UNICODE is UTF-16, as the standard says)."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def openai_mask_to_png(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> bytes:
    """An OpenAI-style mask → GenServe's (white = repaint), as PNG.

    OpenAI marks the area to edit with fully transparent pixels; a mask without any transparency is taken as
    black-and-white, white = edit, as GenServe's own masks are.
    """
    image = decode_image(data, field, max_bytes=max_bytes, max_pixels=max_pixels).image
    transparent = _transparent_area(image)
    if transparent is not None:
        return encode_png(transparent)
    return encode_png(_to_8bit(image).convert("L"))


def transparency_mask(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> bytes | None:
    """The mask an OpenAI edit without one uses: the image's fully transparent pixels (white = repaint), as PNG;
    None when no pixel is fully transparent (the edit is then an img2img of the whole picture)."""
    image = decode_image(data, field, max_bytes=max_bytes, max_pixels=max_pixels).image
    transparent = _transparent_area(image)
    if transparent is None or transparent.getextrema()[1] == 0:
        return None
    return encode_png(transparent)


def _transparent_area(image: Image.Image) -> Image.Image | None:
    """White where the image is fully transparent, black elsewhere; None for an image with no transparency at all
    (no alpha, or every pixel opaque)."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    lowest, _ = alpha.getextrema()  # one band: (min, max)
    if not isinstance(lowest, (int, float)) or lowest == 255:
        return None
    return alpha.point(lambda value: 255 if value == 0 else 0).convert("L")


def image_size(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """Width and height of an encoded image, validated like any input."""
    size: tuple[int, int] = decode_image(data, field, max_bytes=max_bytes, max_pixels=max_pixels).image.size
    return size


def reencode(path: str, fmt: str, quality: int) -> bytes:
    """A stored PNG as PNG (unchanged), JPEG or WEBP bytes."""
    if fmt == "png":
        with open(path, "rb") as file:
            return file.read()
    with Image.open(path) as image:
        parameters = image.info.get(PARAMETERS_KEY, "")
        exif = Image.Exif()
        if parameters:  # keep the generation parameters where the format has room: EXIF UserComment
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _user_comment(parameters)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
        return buffer.getvalue()
