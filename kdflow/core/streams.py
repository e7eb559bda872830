"""Independent random streams, one per (seed, purpose).

A job draws randomness for several purposes: the model's initial weights and
dropout masks, the order of the batches, the augmentation, and a method's own
modules (a hint regressor). Deriving them as `seed`, `seed + 1`, ... would
make seed 0's augmentation stream seed 1's initialisation stream; instead each
purpose gets a child of `numpy.random.SeedSequence(seed)` (spawned by index,
so the mapping is fixed), whose hashed state is independent of every other
(seed, purpose) pair.

Twins: the plain and the distilled student of a seed draw their initial
weights, dropout masks, batch order and augmentation from the same streams,
so they differ only in the loss. A method's modules are initialised from a
generator of their own and never by reseeding torch's global generators,
which on CUDA would also change the dropout stream.
"""

from __future__ import annotations

import numpy as np
import torch

# The order is part of the definition of every stream: append, never reorder.
PURPOSES = ("init", "order", "augment", "method")


def stream_seed(seed: int, purpose: str) -> int:
    """A 64-bit seed for torch generators, unique to (seed, purpose)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    child = np.random.SeedSequence(seed).spawn(len(PURPOSES))[PURPOSES.index(purpose)]
    return int(child.generate_state(1, dtype=np.uint64)[0])


def generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from the (seed, purpose) stream."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose))
