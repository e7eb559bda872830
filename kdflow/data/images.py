"""One image file decoded: PNG or JPEG, turned upright, as RGB, refused before it costs memory or comes out wrong."""

from __future__ import annotations

import io
import struct
from typing import Callable

from kdflow import KdflowError

# Pixels of one image: a tiny PNG can declare a gigapixel canvas (a
# decompression bomb); refused before it is decoded.
MAX_PIXELS = 4096 * 4096


def decode_rgb(payload: bytes, where: str, bad: Callable[[str, str], KdflowError]):
    """The image file in `payload` as an upright RGB Pillow image at its own
    size; a refusal is `bad(where, problem)`, worded by the reader (an
    image tree's advice, kdflow.data.folder)."""
    from PIL import Image, ImageOps  # only the convert step decodes

    try:
        with Image.open(io.BytesIO(payload)) as img:
            # MPO is how Pillow names the JPEGs many phones write (a JPEG
            # with extra frames appended); the first frame is the photo.
            if img.format not in ("PNG", "JPEG", "MPO"):
                raise bad(where, f"a {img.format} image; PNG or JPEG only")
            if img.width * img.height > MAX_PIXELS:
                raise bad(where, f"{img.width}x{img.height} pixels, more than the "
                                 f"{MAX_PIXELS:,} allowed")
            # 16-bit grey PNGs open as I;16/I (F for float data); convert()
            # clips them to 0..255 instead of scaling, so most come out
            # white. Refused rather than silently wrong.
            if img.mode.startswith(("I", "F")):
                raise bad(where, f"a 16-bit or 32-bit image (Pillow mode {img.mode}), "
                                 "which would be clipped, not scaled, to 8 bits; save "
                                 "it as an 8-bit PNG or a JPEG")
            # Phones store the pixels as the sensor saw them and the way to
            # hold the photo in the EXIF Orientation tag; every viewer
            # applies it, so the image the user knows is the turned one.
            # Before any size is compared: a portrait photo is its turned size.
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except KdflowError:
        raise
    # A damaged EXIF block can also raise TypeError or struct.error.
    except (OSError, SyntaxError, ValueError, TypeError, struct.error,
            Image.DecompressionBombError) as e:
        raise bad(where, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
    return rgb
