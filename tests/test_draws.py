"""The stratified draws: the subset and the validation split share one
function (kdflow.data.arrays.balanced_pick), which draws exactly what the
two copies it replaced drew and refuses what each refused."""

from __future__ import annotations

import numpy as np
import pytest

from kdflow import KdflowError
from kdflow.data.arrays import balanced_pick, make_split

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
