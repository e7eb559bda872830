"""Hand references shared by the loss tests (tests/test_losses.py,
tests/test_dkd.py): plain Python floats (float64), loops, math.exp / math.log."""

import math

import torch


def rows(x):
    return [[float(v) for v in r] for r in torch.flatten(x, 1).double()]


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def hand_ce(s, y):
    return sum(lse(r) - r[int(c)] for r, c in zip(rows(s), y)) / len(y)
