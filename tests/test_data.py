import os
import pickle

import numpy as np
import pytest

from kdflow import KdflowError
from kdflow.data.arrays import Splits, channel_stats, make_split, pixel_stats, write_split
from kdflow.data.datasets import convert as convert_archive
from kdflow.data.fetch import fetch_archive
from kdflow.data.unpickle import UnsafePickleError, safe_unpickle
from tests.conftest import build_archive, build_archive_100


class _RunsShell:
    """A pickle that calls os.system when loaded: what an attacker would ship."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsShell(marker)}, protocol=4)
    assert pickle.loads(payload) == {b"data": 0} and marker.exists()  # it is real
    marker.unlink()
    with pytest.raises(UnsafePickleError, match="refusing to unpickle (posix|os).system"):
        safe_unpickle(payload, "data_batch_1")
    assert not marker.exists()


def test_malicious_batch_inside_an_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsShell(marker), b"labels": [0]}, protocol=4)
    archive = tmp_path / "cifar-10-python.tar.gz"
    build_archive(archive, members={"data_batch_3": evil})
    out = tmp_path / "cifar10.npz"
    with pytest.raises(UnsafePickleError, match="data_batch_3"):
        convert_archive(archive, out)
    assert not marker.exists() and not out.exists()


def test_genuine_batches_are_read(tmp_path):
    archive = tmp_path / "a.tar.gz"
    build_archive(archive, n_train=100, n_test=50)
    out = tmp_path / "cifar10.npz"
    info = convert_archive(archive, out)
    assert info["train"] == 100 and info["test"] == 50 and len(info["classes"]) == 10
    with np.load(out) as d:
        assert d["x_train"].dtype == np.uint8 and d["x_train"].shape == (100, 3, 32, 32)
        assert d["x_test"].shape == (50, 3, 32, 32)
        assert list(d["classes"])[:2] == ["airplane", "automobile"]
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz", "cifar10.npz"]


def test_cifar100_fine_labels_and_statistics(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    build_archive_100(archive, n_train=400, n_test=200)
    out = tmp_path / "cifar100.npz"
    info = convert_archive(archive, out, dataset="cifar100")
    assert info["train"] == 400 and info["test"] == 200 and len(info["classes"]) == 100
    with np.load(out) as d:
        # Fine labels (0..99), not the 20 coarse ones stored beside them.
        assert d["y_train"].max() == 99 and len(np.unique(d["y_train"])) == 100
        # Every dataset's statistics are those of its own training images.
        stats = pixel_stats(d["x_train"])
        assert channel_stats(d) == stats and 0.2 < stats[0][0] < 0.8
    split = tmp_path / "split.npz"
    write_split(out, split, val_size=100, seed=0)
    data = Splits(out, split)
    assert data.num_classes == 100 and len(data.val_y) == 100
    assert data.mean == stats[0]


def test_wrong_dataset_for_the_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    build_archive(archive)
    with pytest.raises(KdflowError, match="lacks cifar-100-python/meta.*data.dataset"):
        convert_archive(archive, tmp_path / "x.npz", dataset="cifar100")


def test_python2_style_string_pickles_are_accepted():
    # The published batches were written by Python 2: bytes as SHORT_BINSTRING.
    payload = b"\x80\x02}q\x00U\x06labelsq\x01]q\x02(K\x01K\x02es."
    assert safe_unpickle(payload) == {b"labels": [1, 2]}


def test_garbage_is_a_clear_error():
    with pytest.raises(KdflowError, match="not a readable CIFAR batch"):
        safe_unpickle(b"\x80\x02not a pickle", "test_batch")


def test_fetch_verifies_md5_and_leaves_nothing_on_mismatch(tmp_path):
    src = tmp_path / "src.tar.gz"
    md5 = build_archive(src, n_train=50, n_test=10)
    dest = tmp_path / "out" / "cifar-10-python.tar.gz"
    with pytest.raises(KdflowError, match="md5 mismatch.*data.md5"):
        fetch_archive(src.as_uri(), "0" * 32, dest)
    assert list(dest.parent.iterdir()) == []
    fetch_archive(src.as_uri(), md5, dest)            # file:// URL
    assert dest.read_bytes() == src.read_bytes()
    fetch_archive(str(src), md5, dest)                # plain path


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(KdflowError, match="not found.*data.url"):
        fetch_archive(str(tmp_path / "nope.tar.gz"), "0" * 32, tmp_path / "x")


def labels(n_per_class=100, classes=10):
    return np.repeat(np.arange(classes), n_per_class)[np.random.default_rng(1).permutation(n_per_class * classes)]


def test_validation_split_is_disjoint_balanced_and_reproducible():
    y = labels()
    train, val = make_split(y, 200, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(y)
    assert np.array_equal(np.union1d(train, val), np.arange(len(y)))
    assert np.bincount(y[val]).tolist() == [20] * 10
    again = make_split(y, 200, seed=0)
    assert np.array_equal(again[1], val)
    other = make_split(y, 200, seed=1)
    assert not np.array_equal(other[1], val)


def test_uneven_split_size_stays_balanced():
    y = labels()
    _, val = make_split(y, 205, seed=0)
    counts = np.bincount(y[val])
    assert counts.sum() == 205 and counts.max() - counts.min() == 1


@pytest.mark.parametrize("size", [5, 1000])
def test_impossible_split_sizes_are_clear_errors(size):
    with pytest.raises(KdflowError, match="data.val_size"):
        make_split(labels(), size, seed=0)
