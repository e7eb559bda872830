"""How one image becomes the model's pixels (kdflow.data.images): alpha
composited on the stated background, the shorter side resized and the centre
cropped exactly as torchvision's Resize + CenterCrop, and the whole
preparation recorded in the converted .npz (kdflow.data.preprocessing)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kdflow import KdflowError
from kdflow.data import images, preprocessing
from kdflow.data.arrays import write_dataset, write_subset
from kdflow.data.datasets import convert, preprocessing_of
from tests.helpers.hostile import make_tree


def _bad(where, problem):
    return KdflowError(f"{where}: {problem}")


def _png(x: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(x, mode) if mode else Image.fromarray(x)).save(buf, "PNG", **save)
    return buf.getvalue()


def _decoded(payload: bytes) -> np.ndarray:
    return np.asarray(images.decode_rgb(payload, "x.png", _bad)).astype(int)


def _converted(tree, tmp_path, **kw) -> dict:
    out = tmp_path / "folder.npz"
    convert(tree, out, dataset="folder", **kw)
    with np.load(out) as d:
        return {k: d[k] for k in d.files}


# --------------------------------------------------------------------------
# Alpha
# --------------------------------------------------------------------------

def test_a_fully_transparent_red_pixel_comes_out_as_the_background():
    assert preprocessing.BACKGROUND == (255, 255, 255)
    x = np.zeros((4, 4, 4), np.uint8)
    x[...] = (255, 0, 0, 0)             # red, fully transparent
    x[0, 0] = (255, 0, 0, 255)          # red, opaque
    x[0, 1] = (0, 0, 0, 128)            # black, half transparent
    got = _decoded(_png(x, "RGBA"))
    assert got[3, 3].tolist() == [255, 255, 255]
    assert got[0, 0].tolist() == [255, 0, 0]
    assert np.abs(got[0, 1] - 127).max() <= 1      # half-way to white


@pytest.mark.parametrize("kind", ["LA", "P", "RGB tRNS"])
def test_every_kind_of_png_transparency_is_composited(kind):
    # Grey with alpha, a palette's alpha table, and an RGB PNG naming one
    # transparent colour: each a transparent red (or grey) pixel beside an
    # opaque one.
    if kind == "LA":
        x = np.array([[[90, 0], [90, 255]]], np.uint8)
        payload, opaque = _png(x, "LA"), [90, 90, 90]
    elif kind == "P":
        img = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=bytes([0, 255]))
        payload, opaque = buf.getvalue(), [0, 0, 255]
    else:
        x = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
        payload, opaque = _png(x, transparency=(255, 0, 0)), [0, 0, 255]
    got = _decoded(payload)
    assert got[0, 0].tolist() == [255, 255, 255], kind
    assert got[0, 1].tolist() == opaque, kind


# --------------------------------------------------------------------------
# Resize and crop
# --------------------------------------------------------------------------

@pytest.mark.parametrize("w, h, side", [(97, 50, 32), (50, 97, 32), (96, 32, 32),
                                        (33, 32, 32), (101, 100, 64), (20, 30, 32),
                                        (80, 80, 64), (640, 480, 96)])
def test_resize_and_crop_are_torchvisions_pixel_for_pixel(w, h, side):
    from torchvision.transforms import functional as F

    x = np.random.default_rng(w * h + side).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(x)
    ours = np.asarray(images.square(img, side, "x.png", _bad))
    theirs = np.asarray(F.center_crop(F.resize(img, side), side))
    assert ours.shape == (side, side, 3)
    assert np.array_equal(ours, theirs)     # identical, not merely close


@pytest.mark.parametrize("w, h", [(96, 32), (32, 96)])
def test_a_3_to_1_image_is_centre_cropped_not_squashed(tmp_path, w, h):
    # Thirds along the long side: red, green, blue. Cropped, only green is
    # left; squashed, all three would be.
    x = np.zeros((h, w, 3), np.uint8)
    third = max(w, h) // 3
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if w > h:
            x[:, k * third:(k + 1) * third] = colour
        else:
            x[k * third:(k + 1) * third] = colour
    tree = make_tree(tmp_path / "t", train=1, test=1, classes=["a", "b"])
    (tree / "train" / "a" / "000.png").write_bytes(_png(x))
    got = _converted(tree, tmp_path)["x_train"][0].transpose(1, 2, 0)
    assert got.shape == (32, 32, 3)
    assert (got == (0, 255, 0)).all()


def test_images_of_mixed_sizes_and_shapes_share_a_tree(tmp_path):
    # Each is resized and cropped on its own: no size need be shared.
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    x = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    (tree / "train" / "b" / "001.png").write_bytes(_png(x))
    got = _converted(tree, tmp_path)["x_train"]
    want = images.square(Image.fromarray(x), 32, "x", _bad)
    assert (got[3].transpose(1, 2, 0) == np.asarray(want)).all()


def test_a_sliver_that_would_resize_to_too_many_pixels_is_one_clear_line(tmp_path):
    tree = make_tree(tmp_path / "t", train=1, test=1, classes=["a", "b"])
    (tree / "train" / "a" / "000.png").write_bytes(_png(np.zeros((4000, 2, 3), np.uint8)))
    with pytest.raises(KdflowError) as e:
        convert(tree, tmp_path / "f.npz", dataset="folder", image_size=128)
    message = str(e.value)
    assert "\n" not in message and "a/000.png: 2x4000 pixels" in message
    assert "128x256000" in message and "crop it nearer to square" in message
    assert not (tmp_path / "f.npz").exists()


# --------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------

def test_the_preparation_travels_with_the_converted_images(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"], size=40)
    out = tmp_path / "folder.npz"
    convert(tree, out, dataset="folder", image_size=32)
    with np.load(out) as d:
        stored = json.loads(str(d["preprocessing"]))
        recorded = preprocessing_of(d)
        mean, std = d["mean"].tolist(), d["std"].tolist()
    assert stored == preprocessing.folder_steps(32)
    assert stored["resize"].startswith("shorter side to 32, bilinear, antialiased")
    assert stored["crop"].startswith("centre 32x32")
    assert stored["exif"] == "turned upright (EXIF orientation)"
    assert stored["alpha"] == "composited on white (255,255,255)"
    assert stored["colour"] == "RGB"
    assert recorded == {**stored, "normalisation": preprocessing.normalisation(mean, std)}
    # A subset is a copy of the images: the record comes along.
    write_subset(out, tmp_path / "sub.npz", train=2, test=2, seed=0)
    with np.load(tmp_path / "sub.npz") as d:
        assert preprocessing_of(d) == recorded


def test_older_files_say_what_is_known_and_no_more(tmp_path):
    x = np.zeros((2, 3, 32, 32), np.uint8)
    y = np.array([0, 1])
    for name in ("cifar10", "folder"):
        write_dataset(tmp_path / f"{name}.npz", name, x, y, x, y, ["a", "b"])
    with np.load(tmp_path / "cifar10.npz") as d:
        cifar = preprocessing_of(d)
    # CIFAR has always been used as stored: no resize, no crop.
    assert {k: v for k, v in cifar.items() if k != "normalisation"} == \
        preprocessing.stored_steps(32)
    assert cifar["resize"].startswith("none") and cifar["crop"] == "none"
    with np.load(tmp_path / "folder.npz") as d:
        assert preprocessing_of(d)["recorded"] is False
