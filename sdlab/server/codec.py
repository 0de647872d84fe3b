"""Images over HTTP: base64 text in (with or without a `data:image/png;base64,` prefix), PNG bytes out.

Every failure is a `FieldError` naming the request field, which the server answers with 422."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping

from PIL import Image, ImageOps, PngImagePlugin

from sdlab.errors import SdlabError
from sdlab.pipelines.images import load_image


class FieldError(SdlabError):
    """Bad input in one request field; `str(err)` is `field: what is wrong`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def decode_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise FieldError(field, "empty; send the image as base64 text")
    text = text.strip()
    if text.startswith(("http://", "https://")):
        raise FieldError(field, "the server does not fetch URLs; send the image itself as base64")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise FieldError(field, f"a data URL must be base64 ('data:image/png;base64,...'), got {header[:40]!r}")
    text = "".join(text.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None


def decode_image(text: str, field: str, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    """An image sent as base64 -> PIL: RGB with transparency flattened onto white (as files are read),
    or, with `keep_alpha` (masks), its own mode. Its size is checked from the header before decoding."""
    data = decode_base64(text, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FieldError(field, "not an image (PNG, JPEG or WebP, base64-encoded)") from None
    if width * height > max_pixels:
        raise FieldError(field, f"{width}x{height} is larger than this server takes ({max_pixels} pixels)")
    try:
        if not keep_alpha:
            return load_image(io.BytesIO(data))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (SdlabError, OSError, SyntaxError, ValueError):
        raise FieldError(field, "not a readable image (truncated or damaged)") from None


def png_bytes(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    """A PNG with text chunks, e.g. A1111's `parameters`."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
