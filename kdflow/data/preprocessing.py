"""What conversion does to each image, described once: stored in the converted .npz, copied into export.json.

A deployed model is only right on images prepared as its training images
were, so the preparation is recorded with the data: conversion stores the
description of its dataset (`folder_steps` or `stored_steps`) in the .npz
(kdflow.data.datasets), a subset keeps it, and the export step writes it,
with the normalisation the model applies, into export.json
(kdflow.deploy.job). The operations themselves are kdflow.data.images;
they take their background and filter from here, so the record and the
code cannot drift apart.
"""

from __future__ import annotations

# Under a transparent pixel: what most viewers, browsers included, show
# behind a transparent PNG, so the image the user knows. Dropping alpha
# instead (Pillow's convert("RGB"), torchvision's ImageFolder loader) keeps
# whatever colour the invisible pixels happen to store.
BACKGROUND = (255, 255, 255)
BACKGROUND_NAME = "white"
# Pillow's filter, by name (kdflow.data.images looks it up): torchvision's
# Resize on a PIL image uses the same call, and Pillow widens the filter by
# the reduction factor, so downscaling is antialiased.
RESIZE_FILTER = "bilinear"
# The entry of the converted .npz that holds the description (a JSON string).
NPZ_KEY = "preprocessing"


def folder_steps(side: int) -> dict:
    """An image-folder dataset's preparation at data.image_size `side`, in
    the order applied: what a deployment must do to a photo, step by step,
    to feed the exported model (which then takes the 0..255 pixels)."""
    s = side
    return {
        "source": "PNG or JPEG files, decoded with Pillow",
        "exif": "turned upright (EXIF orientation)",
        "alpha": f"composited on {BACKGROUND_NAME} ({','.join(map(str, BACKGROUND))})",
        "background": list(BACKGROUND),
        "colour": "RGB",
        "resize": f"shorter side to {s}, bilinear, antialiased (the longer side to "
                  f"int({s} * longer / shorter); Pillow's BILINEAR resize, as "
                  f"torchvision's Resize({s}) on a PIL image)",
        "crop": f"centre {s}x{s}: top = round((height - {s}) / 2), left = "
                f"round((width - {s}) / 2) with Python's round, as torchvision's "
                f"CenterCrop({s})",
        "image_size": s,
    }


def stored_steps(side: int) -> dict:
    """A dataset whose archive holds the pixels themselves (CIFAR), used as
    they are: nothing decoded, turned, resized or cropped."""
    return {
        "source": f"pixel arrays of the dataset's archive, {side}x{side}, used as stored",
        "exif": "none (no image files)",
        "alpha": "none (RGB pixels)",
        "colour": "RGB",
        "resize": f"none: the images are {side}x{side} already",
        "crop": "none",
        "image_size": side,
    }


def not_recorded() -> dict:
    """For a .npz written before the preparation was recorded: said so,
    rather than guessed."""
    return {"recorded": False,
            "note": "converted by a kdflow that did not record its preprocessing; "
                    "convert the dataset again to record it"}


def normalisation(mean, std) -> dict:
    """The per-channel normalisation the model applies after the steps
    above (built into the exported ONNX file, kdflow.deploy.onnx_export)."""
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "formula": "(pixel / 255 - mean) / std, per channel, RGB order"}
