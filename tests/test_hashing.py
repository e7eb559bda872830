"""The one file digest (kdflow.core.hashing): what every checksum of a file is."""

import hashlib

import pytest

from kdflow.core import hashing


@pytest.mark.parametrize("size", [0, 1, hashing.CHUNK - 1, hashing.CHUNK, 3 * hashing.CHUNK + 7])
def test_a_file_digest_is_hashlibs_digest_of_its_bytes_whatever_its_size(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hashing.file_digest(path) == hashlib.sha256(data).hexdigest()
    assert hashing.file_digest(str(path), "md5") == hashlib.md5(data).hexdigest()
