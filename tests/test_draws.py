"""The stratified draws: the subset and the validation split share one
function (kdflow.data.arrays.balanced_pick), which draws exactly what the
two copies it replaced drew and refuses what each refused; and the sizes
they need are checked from a tree's listing before it is converted."""

from __future__ import annotations

import hashlib
import logging
import runpy
import tarfile
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from kdflow import KdflowError
from kdflow.core import schema
from kdflow.data import folder
from kdflow.data.arrays import balanced_pick, check_draws, make_split
from kdflow.data.datasets import check_sizes
from tests.helpers.hostile import make_tree
from tests.conftest import REPO

# --------------------------------------------------------------------------
# The two copies as they were (kdflow/data/arrays.py before the merge),
# verbatim: the oracle the one function is held to.
# --------------------------------------------------------------------------


def old_balanced_pick(labels, size, rng, what, setting):
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if size < len(classes):
        raise KdflowError(
            f"{setting} = {size} leaves some of the {len(classes)} classes without "
            f"{what} images; use at least {len(classes)}")
    base, extra = divmod(size, len(classes))
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = base + (1 if i < extra else 0)
        if k > len(members):
            raise KdflowError(
                f"{setting} = {size} needs {k} {what} images of class {c} but it has only "
                f"{len(members)}; lower {setting} (or set it to 0 for all images)")
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


def old_make_split(labels, val_size, seed):
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_classes = len(classes)
    if val_size < n_classes:
        raise KdflowError(
            f"data.val_size = {val_size} leaves some of the {n_classes} classes "
            f"without validation images; use at least {n_classes}"
        )
    rng = np.random.default_rng(seed)
    base, extra = divmod(val_size, n_classes)
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = base + (1 if i < extra else 0)
        if k >= len(members):
            raise KdflowError(
                f"data.val_size = {val_size} needs {k} validation images of class "
                f"{c} but it has only {len(members)} training images; lower data.val_size"
            )
        picks.append(rng.choice(members, size=k, replace=False))
    val_idx = np.sort(np.concatenate(picks))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def label_vectors():
    """Balanced and unbalanced, shuffled and sorted, labels that skip
    values, int32 and a plain list: what the draw may be handed."""
    rng = np.random.default_rng(7)
    yield "balanced", rng.permutation(np.repeat(np.arange(10), 30))
    yield "sorted", np.repeat(np.arange(4), 9)
    yield "unbalanced", rng.permutation(np.repeat(np.arange(5), [3, 8, 13, 21, 34]))
    yield "sparse values", rng.permutation(np.repeat(np.array([3, 7, 42]), [6, 5, 7]))
    yield "int32", rng.permutation(np.repeat(np.arange(6), 11)).astype(np.int32)
    yield "list", [int(v) for v in rng.integers(0, 3, 40)]


def outcome(f, *args):
    """What a draw gives: its index arrays (values and dtype), or its refusal."""
    try:
        out = f(*args)
    except KdflowError as e:
        return ("refused", str(e))
    return tuple((a.dtype.str, a.tolist()) for a in (out if isinstance(out, tuple) else (out,)))


SIZES = [1, 2, 3, 4, 5, 6, 9, 10, 12, 15, 18, 20, 25, 36, 40, 61, 100, 299, 300]


@pytest.mark.parametrize("name, labels", list(label_vectors()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_the_one_draw_gives_what_both_copies_gave(name, labels):
    drawn = refused = 0
    for size in SIZES:
        for seed in range(4):
            for stream in (0, 1):     # the subset's generators, seeded (seed, part)
                got = outcome(balanced_pick, labels, size, np.random.default_rng([seed, stream]),
                              "train", "data.subset.train")
                want = outcome(old_balanced_pick, labels, size,
                               np.random.default_rng([seed, stream]), "train", "data.subset.train")
                assert got == want, (name, size, seed, stream)
            got, want = (outcome(f, labels, size, seed) for f in (make_split, old_make_split))
            assert got == want, (name, size, seed)
            drawn += got[0] != "refused"
            refused += got[0] == "refused"
    assert drawn and refused     # both branches compared


def test_a_subset_may_take_a_class_whole_but_the_split_may_not():
    labels = np.repeat(np.arange(3), 4)
    # Four a class: the subset takes all twelve, every class whole.
    assert balanced_pick(labels, 12, np.random.default_rng(0), "train",
                         "data.subset.train").tolist() == list(range(12))
    # The split must leave each class an image to train on.
    with pytest.raises(KdflowError, match="data.val_size = 12 needs 4 validation images of "
                                          "class 0 but it has only 4 training images"):
        make_split(labels, 12, seed=0)
    train, val = make_split(labels, 9, seed=0)
    assert np.bincount(labels[train]).tolist() == [1, 1, 1]


# --------------------------------------------------------------------------
# The sizes told before conversion
# --------------------------------------------------------------------------

def refusal(f, *args, **kw) -> str | None:
    try:
        f(*args, **kw)
    except KdflowError as e:
        return str(e)
    return None


def the_steps(y_train, y_test, val_size, subset_train, subset_test) -> str | None:
    """What the subset and split steps refuse, drawn as they draw (first
    refusal, in their order)."""
    def steps():
        y = y_train
        if subset_train:
            y = y_train[balanced_pick(y_train, subset_train, np.random.default_rng([0, 0]),
                                      "train", "data.subset.train")]
        if subset_test:
            balanced_pick(y_test, subset_test, np.random.default_rng([0, 1]), "test",
                          "data.subset.test")
        make_split(y, val_size, seed=0)
    return refusal(steps)


def test_the_draws_are_checked_from_the_labels_as_the_steps_refuse_them():
    rng = np.random.default_rng(3)
    y_train = rng.permutation(np.repeat(np.arange(4), [5, 6, 9, 12]))
    y_test = rng.permutation(np.repeat(np.arange(4), 3))
    told = refused = 0
    for val_size in (3, 4, 8, 17, 20, 21, 32, 5000):
        for subset_train in (0, 4, 8, 13, 20, 21, 40):
            for subset_test in (0, 4, 12, 13):
                want = the_steps(y_train, y_test, val_size, subset_train, subset_test)
                got = refusal(check_draws, y_train, y_test, val_size, subset_train, subset_test)
                assert got == want, (val_size, subset_train, subset_test)
                told += got is not None
                refused += got is None
    assert told and refused


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """Three classes of two training images (and one test image) each, as a
    directory, a .tar.gz and a .zip."""
    root = tmp_path_factory.mktemp("small")
    tree = make_tree(root / "tree", train=2, test=1, classes=["a", "b", "c"])
    with tarfile.open(root / "tree.tar.gz", "w:gz") as t:
        t.add(tree, arcname="tree")
    with zipfile.ZipFile(root / "tree.zip", "w") as z:
        for p in sorted(tree.rglob("*.png")):
            z.write(p, f"tree/{p.relative_to(tree).as_posix()}")
    return [tree, root / "tree.tar.gz", root / "tree.zip"]


def test_a_tree_smaller_than_data_val_size_is_told_before_any_image_is_decoded(
        small_tree, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("an image was decoded before the sizes were checked")

    monkeypatch.setattr(folder._Tree, "_decode", no_decoding)
    data = {"val_size": schema.default("data.val_size"),
            "subset": {k: schema.default(f"data.subset.{k}") for k in ("train", "test")}}
    assert data == {"val_size": 5000, "subset": {"train": 0, "test": 0}}   # the defaults
    for source in small_tree:
        with pytest.raises(KdflowError, match=r"^data.val_size = 5000 needs 1667 validation "
                                              r"images of class 0 but it has only 2 training "
                                              r"images; lower data.val_size$"):
            check_sizes(source, "folder", data)
        # A size the tree can give passes; so does CIFAR, whose sizes are fixed.
        check_sizes(source, "folder", {**data, "val_size": 3})
    check_sizes(small_tree[1], "cifar10", data)


def run_convert_script(step: SimpleNamespace) -> int:
    """scripts/convert.py as Snakemake runs it, `step` its `snakemake`; its
    exit status. The root logger's handlers it adds are taken off again, so
    nothing of the job outlives it here."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        runpy.run_path(str(REPO / "scripts" / "convert.py"), init_globals={"snakemake": step})
        return 0
    except SystemExit as e:
        return e.code
    finally:
        for h in root.handlers[len(handlers):]:
            h.close()
        root.handlers[:], root.level = handlers, level


def test_the_convert_step_checks_the_sizes_before_it_converts(small_tree, tmp_path, monkeypatch):
    decoded = []
    monkeypatch.setattr(folder._Tree, "_decode", lambda *a: decoded.append(a))
    archive = small_tree[1]
    log, out = tmp_path / "convert.log", tmp_path / "folder.npz"
    step = SimpleNamespace(
        input=[str(archive)], output=[str(out)], log=[str(log)],
        params=SimpleNamespace(dataset="folder", directory="", image_size=32,
                               md5=hashlib.md5(archive.read_bytes()).hexdigest()),
        config={"data": {"val_size": 5000, "subset": {"train": 0, "test": 0}}})
    assert run_convert_script(step) == 1
    assert "data.val_size = 5000 needs 1667 validation images" in log.read_text()
    assert not decoded and not out.exists()
    # A changed archive is told as that, before its sizes.
    md5, step.params.md5 = step.params.md5, "0" * 32
    assert run_convert_script(step) == 1
    assert "not data.md5 " + "0" * 32 in log.read_text()
    # Sizes the tree can give: converted.
    monkeypatch.undo()
    step.params.md5, step.config["data"]["val_size"] = md5, 3
    assert run_convert_script(step) == 0 and out.exists()
