"""One image file decoded: PNG or JPEG, upright, alpha composited, RGB, resized and centre-cropped.

Each is refused before it costs memory or comes out wrong.

What these steps are, for the record a deployment follows, is
kdflow.data.preprocessing; the background and the filter come from there.
"""

from __future__ import annotations

import io
import struct
from typing import Callable

from kdflow import KdflowError
from kdflow.data.preprocessing import BACKGROUND, RESIZE_FILTER

# Pixels of one image: a tiny PNG can declare a gigapixel canvas (a
# decompression bomb); refused before it is decoded.
MAX_PIXELS = 4096 * 4096


def decode_rgb(payload: bytes, where: str, bad: Callable[[str, str], KdflowError]):
    """The image file in `payload` as an upright RGB Pillow image at its own
    size, any transparency composited on BACKGROUND; a refusal is
    `bad(where, problem)`, worded by the reader (an image tree's advice,
    kdflow.data.folder)."""
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
            rgb = _opaque(ImageOps.exif_transpose(img))
    except KdflowError:
        raise
    # A damaged EXIF block can also raise TypeError or struct.error.
    except (OSError, SyntaxError, ValueError, TypeError, struct.error,
            Image.DecompressionBombError) as e:
        raise bad(where, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
    return rgb


def _opaque(img):
    """`img` as RGB with its transparency composited on BACKGROUND. A plain
    convert("RGB") drops alpha and keeps the colour invisible pixels store
    (often red or black, never what a viewer shows). Transparency comes as
    an alpha band (RGBA, LA, PA) or as a tRNS entry in `info` (a palette's
    alpha table, or one transparent colour of an L or RGB PNG), which
    convert("RGBA") turns into alpha."""
    from PIL import Image

    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    ground = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(ground, rgba).convert("RGB")


def centre_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """The centre side x side box (left, top, right, bottom) of an image
    whose shorter side is `side`, rounded as torchvision's CenterCrop
    (Python's round, halves to even) so a deployment using it crops the
    same pixels."""
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    return left, top, left + side, top + side


def square(rgb, side: int, where: str, bad: Callable[[str, str], KdflowError]):
    """`rgb` resized so its shorter side is `side`, then centre-cropped to
    side x side: torchvision's Resize(side) + CenterCrop(side) on a PIL
    image, the same Pillow calls, so the pixels are identical to theirs.
    Never squashed: a 3:1 image keeps its middle third. An image already
    side x side is returned as it is. A refusal is `bad(where, problem)`."""
    from PIL import Image

    w, h = rgb.size
    if (w, h) == (side, side):
        return rgb
    # torchvision's sizes: the shorter side to `side`, the longer truncated
    # (int), not rounded.
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    # The whole image is resized before the crop, as torchvision does (a
    # resize of the cropped box alone can differ by a grey level); a sliver
    # (1x4000 at side 1024) would become gigapixels, so it is refused first.
    if size[0] * size[1] > MAX_PIXELS:
        raise bad(where, f"{w}x{h} pixels: with its shorter side resized to {side} it "
                         f"would be {size[0]}x{size[1]}, more than the {MAX_PIXELS:,} "
                         "pixels allowed; crop it nearer to square or lower "
                         "data.image_size")
    if size != (w, h):
        rgb = rgb.resize(size, Image.Resampling[RESIZE_FILTER.upper()])
    return rgb.crop(centre_box(*rgb.size, side))
