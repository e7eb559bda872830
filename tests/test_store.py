"""Images read in place from the converted .npz (kdflow.data.store): the
same pixels, batches and trained weights as when they are held resident."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdflow import KdflowError
from kdflow.data.arrays import Normalizer, Splits, write_dataset, write_split, write_subset
from kdflow.data.store import (NpzWriter, StoredImages, choose_placement, chunks_of,
                               member_layout, open_images)
from kdflow.models.inference import predict_logits
from kdflow.models.zoo import build_model
from kdflow.train.engine import TrainConfig, fit
from kdflow.workflow.config import validate

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.integers(0, 60, (120, 3, 16, 16), dtype=np.uint8)
    x[np.arange(120), y] += 150          # class by colour: learnable in a few steps
    yt = np.repeat(np.arange(3), 10)
    xt = rng.integers(0, 255, (30, 3, 16, 16), dtype=np.uint8)
    write_dataset(d / "data.npz", "folder", x, y, xt, yt, CLASSES)
    write_split(d / "data.npz", d / "split.npz", 15, seed=1)
    return d / "data.npz", d / "split.npz", x, xt


def test_the_stored_images_read_as_numpy_holds_them(dataset):
    path, _, x, xt = dataset
    assert member_layout(path, "x_train")[1:] == (np.dtype(np.uint8), x.shape)
    s = StoredImages.from_npz(path, "x_train")
    rows = np.random.default_rng(3).permutation(120)[:37]
    assert np.array_equal(s[torch.from_numpy(rows)].numpy(), x[rows])
    assert np.array_equal(s[5:50].numpy(), x[5:50])
    assert np.array_equal(s.read([7, 7, 3]), x[[7, 7, 3]])          # repeats, any order
    view = s.view(rows)
    assert len(view) == 37 and np.array_equal(view.read([2, 0]), x[rows[[2, 0]]])
    assert np.array_equal(torch.cat(list(s.batches([rows[:10], rows[10:]]))).numpy(), x[rows])
    with pytest.raises(IndexError):
        s.read([120])
    # A compressed member (not written by kdflow) cannot be read in place.
    np.savez_compressed(path.with_name("z.npz"), x_train=x)
    assert StoredImages.from_npz(path.with_name("z.npz"), "x_train") is None


def test_a_truncated_file_is_one_line(dataset, tmp_path):
    path, _, x, _ = dataset
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes())
    s = StoredImages.from_npz(cut, "x_test")
    with open(cut, "r+b") as f:
        f.truncate(s._offset + 100)
    with pytest.raises(KdflowError, match=r"cut.npz: ends before its images do"):
        s.read(slice(0, 30))


def test_the_writer_writes_what_np_load_reads(tmp_path, dataset):
    path, _, x, _ = dataset
    with open(tmp_path / "w.npz", "wb") as f, NpzWriter(f) as w:
        w.add_chunks("x", np.uint8, x.shape, chunks_of(StoredImages.from_npz(path, "x_train"),
                                                      chunk_bytes=1000))
        w.add("names", np.array(CLASSES))
        w.add("empty", np.zeros((0, 3), np.int64))
        w.add("scalar", np.int64(7))
        with pytest.raises(ValueError, match="bytes written"):
            w.add_chunks("short", np.uint8, (5, 2), [np.zeros((4, 2), np.uint8)])
    with np.load(tmp_path / "w.npz") as d:
        assert np.array_equal(d["x"], x) and list(d["names"]) == CLASSES
        assert d["empty"].shape == (0, 3) and int(d["scalar"]) == 7


def test_a_subset_is_written_from_the_stored_images(dataset, tmp_path):
    path, _, x, xt = dataset
    write_subset(path, tmp_path / "sub.npz", train=30, test=9, seed=4)
    with np.load(tmp_path / "sub.npz") as d:
        rows = [np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0] for img in d["x_train"]]
        assert np.array_equal(d["x_train"], x[rows]) and len(rows) == 30
        assert d["x_test"].shape == (9, 3, 16, 16)


def test_placement_auto_resident_and_streamed():
    cpu = torch.device("cpu")
    assert choose_placement(1, cpu, {"images": "streamed"})[0] == "streamed"
    assert choose_placement(1 << 50, cpu, {"images": "resident"})[0] == "resident"
    mode, why = choose_placement(1 << 50, cpu, {"images": "auto", "cpu_share": 0.25})
    assert mode == "streamed" and why.startswith("auto: ") and "over 25% of" in why
    assert choose_placement(1 << 10, cpu, {})[0] == "resident"
    with pytest.raises(KdflowError, match="placement.images is 'disk'"):
        choose_placement(1, cpu, {"images": "disk"})


def test_streamed_and_resident_train_to_the_same_weights(dataset):
    # The same batches in the same order: on the CPU a fixed seed gives
    # bit-identical weights, history and logits whichever path holds them.
    path, split, _, _ = dataset
    valid = validate({"teacher": {"model": "lightnn", "epochs": 2, "batch_size": 16,
                                  "augment": {"crop": 2, "flip": True}}})
    cfg = TrainConfig.from_config(valid["teacher"], valid["engine"])
    results = {}
    for mode in ("resident", "streamed"):
        data = Splits(path, split, "cpu", {"images": mode})
        assert isinstance(data.train_x, StoredImages) == (mode == "streamed")
        assert data.placement.startswith("images read per batch" if mode == "streamed"
                                          else "images resident")
        torch.manual_seed(0)
        model = build_model("lightnn", num_classes=3, image_size=16)
        best = fit(model, data.train_x, data.train_y, data.val_x, data.val_y, cfg, seed=5)
        model.load_state_dict(best.best_state)
        results[mode] = (best, predict_logits(model, data.test_x, Normalizer("cpu"),
                                              batch_size=7))
    (a, la), (b, lb) = results["resident"], results["streamed"]
    def results_of(history):       # everything but the wall-clock seconds
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert results_of(a.history) == results_of(b.history) and len(a.history) == 2
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert torch.equal(la, lb)
    # Both paths are open_images's: a job holds exactly what it asks for.
    (x,), _ = open_images(path, [("x_test", None)], "cpu", {"images": "streamed"})
    assert len(x) == 30
