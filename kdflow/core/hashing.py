"""File digests: one streaming reader for every checksum kdflow takes of a file."""

from __future__ import annotations

import hashlib
import os

# Read a file in pieces of this many bytes: a dataset archive or a
# checkpoint is never held whole just to be hashed.
CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """The hex digest of a file's bytes by `algo` (any name hashlib knows:
    sha256 for kdflow's own records, md5 for the published checksums that
    data.md5 and the weights' md5 give)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()
