"""Augmentation for real images: torchvision's RandomResizedCrop, batched on
the device, beside the translation crop and the flip."""

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from kdflow import KdflowError
from kdflow.train.augment import Augment, ResizedCrop, augment_batch, crop_boxes, resized_crop
from kdflow.workflow.config import validate

DEFAULT = ResizedCrop(scale=(0.08, 1.0), ratio=(0.75, 4 / 3))


def images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def test_boxes_have_the_drawn_area_and_ratio_and_lie_inside_the_image():
    b = crop_boxes(4000, 96, 128, DEFAULT, torch.Generator().manual_seed(1))
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 96).all() and (left + w <= 128).all() and (h >= 1).all() and (w >= 1).all()
    area = h * w / (96 * 128)
    # Rounding the sides moves the area and ratio by at most a pixel's worth.
    assert area.min() > 0.08 * 0.8 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    # The same distribution as torchvision's own sampler on this image size.
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 96, 128), [0.08, 1.0],
                                                        [0.75, 4 / 3]) for _ in range(4000)],
                          dtype=torch.float32)
    t_area = theirs[:, 2] * theirs[:, 3] / (96 * 128)
    t_wide = (theirs[:, 3] > theirs[:, 2]).float().mean()
    for q in (0.1, 0.5, 0.9):
        assert area.quantile(q).item() == pytest.approx(t_area.quantile(q).item(), abs=0.03)
    assert (w > h).float().mean().item() == pytest.approx(t_wide.item(), abs=0.04)


def test_no_box_that_fits_falls_back_to_torchvisions_centre_crop():
    # Aspect 2-3 at the whole area never fits a square: the fallback is the
    # widest centre crop at the smallest ratio, w = 64, h = round(64 / 2).
    rc = ResizedCrop(scale=(1.0, 1.0), ratio=(2.0, 3.0))
    b = crop_boxes(5, 64, 64, rc, torch.Generator().manual_seed(0))
    assert b.tolist() == [[16.0, 0.0, 32.0, 64.0]] * 5


def test_a_whole_image_box_is_the_identity_and_draws_are_reproducible():
    x = images(6, 40, 40)
    whole = ResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(resized_crop(x, whole, torch.Generator().manual_seed(0)), x)
    a = resized_crop(x, DEFAULT, torch.Generator().manual_seed(3))
    b = resized_crop(x, DEFAULT, torch.Generator().manual_seed(3))
    c = resized_crop(x, DEFAULT, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_crop_of_a_left_right_ramp_is_a_wider_ramp():
    # Zooming into a horizontal ramp (4 levels a pixel) keeps it monotone
    # and spreads half its width over the whole image: 2 levels a pixel.
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 1, 64).expand(3, 3, 64, 64)
    out = resized_crop(ramp.contiguous(), ResizedCrop((0.25, 0.25), (1.0, 1.0)),
                       torch.Generator().manual_seed(0))
    row = out[0, 0, 32].float()
    assert (row[1:] >= row[:-1]).all()
    assert (row[-2] - row[1]) / 61 == pytest.approx(2.0, rel=0.1)


def test_without_a_resized_crop_the_flip_and_translation_draws_are_unchanged():
    x = images(8, 32, 32)
    old = Augment(crop=4, flip=True)
    new = Augment(crop=4, flip=True, resized_crop=None)
    assert torch.equal(augment_batch(x, old, torch.Generator().manual_seed(5)),
                       augment_batch(x, new, torch.Generator().manual_seed(5)))
    assert Augment(crop=0, flip=False, resized_crop=DEFAULT).enabled


def test_config_resized_crop_defaults_and_reversed_ranges():
    c = validate({"teacher": {"model": "deepnn", "augment": {"resized_crop": {}}}})
    rc = c["teacher"]["augment"]["resized_crop"]
    assert rc["scale"] == [0.08, 1.0] and rc["ratio"] == pytest.approx([0.75, 4 / 3])
    assert Augment.from_config(c["teacher"]["augment"]).resized_crop == \
        ResizedCrop((0.08, 1.0), (0.75, 4 / 3))
    assert c["student"]["augment"]["resized_crop"] is None
    with pytest.raises(KdflowError, match=r"student.augment.resized_crop.scale: \[1.0, 0.5\] "
                                          r"is \[high, low\]"):
        validate({"student": {"augment": {"resized_crop": {"scale": [1.0, 0.5]}}}})
    assert math.isclose(DEFAULT.ratio[1], 4 / 3)
