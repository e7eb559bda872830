"""data.dataset folder: image trees from a directory, .tar.gz or .zip; the
bad trees each refused with the path named; data.subset; and the workflow
run end to end on a tree the test makes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdflow import KdflowError
from kdflow.workflow.config import validate
from kdflow.data.arrays import balanced_pick, pixel_stats, write_subset
from kdflow.data import folder
from kdflow.data.datasets import archive_name, convert, fetch, fingerprint
from kdflow.data.folder import MAX_MEMBERS
from kdflow.models import checkpoint
from tests.helpers.hostile import TREE_CLASSES as CLASSES
from tests.helpers.hostile import hostile_zip_directory, image_bytes, make_tree, tar_with_long_names
from tests.helpers.childmem import MAX_PEAK, run_capped
from tests.conftest import base_config, planned_jobs, snakemake

def pack(tree: Path, out: Path, wrapper: str = "mytree") -> str:
    """tree packed as .tar.gz or .zip under one top-level directory; its md5."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as z:
            for p in files:
                z.write(p, f"{wrapper}/{p.relative_to(tree).as_posix()}")
    else:
        with tarfile.open(out, "w:gz") as t:
            t.add(tree, arcname=wrapper)
    return hashlib.md5(out.read_bytes()).hexdigest()


def converted(source, tmp_path: Path, **kw) -> dict:
    out = tmp_path / "out" / "folder.npz"
    out.parent.mkdir(exist_ok=True)
    convert(source, out, dataset="folder", **kw)
    with np.load(out) as d:
        return {k: d[k] for k in d.files}


def fails(source, tmp_path: Path, error: str, **kw) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(KdflowError, match=error):
        convert(source, out / "folder.npz", dataset="folder", **kw)
    assert os.listdir(out) == []     # no .npz, no .part


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("png") / "tree")


# --------------------------------------------------------------------------
# Good trees
# --------------------------------------------------------------------------

def test_a_png_directory_converts(png_tree, tmp_path):
    d = converted(png_tree, tmp_path)
    assert d["x_train"].shape == (120, 3, 32, 32) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (40, 3, 32, 32)
    assert list(d["classes"]) == CLASSES
    assert np.bincount(d["y_train"]).tolist() == [12] * 10
    # Pixels kept exactly (PNG is lossless), in file-name order within a class.
    first = np.asarray(Image.open(png_tree / "train" / "c0" / "000.png")).transpose(2, 0, 1)
    assert (d["x_train"][0] == first).all()
    # Statistics from its own training images, as for every dataset.
    assert tuple(d["mean"]) == pixel_stats(d["x_train"])[0]


def test_classes_are_sorted_by_name(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["zebra", "ant", "moth"])
    d = converted(tree, tmp_path)
    assert list(d["classes"]) == ["ant", "moth", "zebra"]


def test_jpeg_of_another_size_is_resized(tmp_path):
    tree = make_tree(tmp_path / "t", train=3, test=2, size=40, fmt="JPEG")
    d = converted(tree, tmp_path)
    assert d["x_train"].shape == (30, 3, 32, 32) and d["x_test"].shape == (20, 3, 32, 32)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("big") / "tree", train=2, test=1, size=80)


def test_data_image_size_sets_the_side_of_the_arrays(big_tree, tmp_path):
    d = converted(big_tree, tmp_path, image_size=64)
    assert d["x_train"].shape == (20, 3, 64, 64) and d["x_test"].shape == (10, 3, 64, 64)
    assert d["x_train"].dtype == np.uint8
    # Resized once, from the image as it is, as torchvision's Resize(64) +
    # CenterCrop(64) (a square image: the crop keeps it whole).
    from torchvision.transforms import functional as F

    with Image.open(big_tree / "train" / "c0" / "000.png") as img:
        want = np.asarray(F.center_crop(F.resize(img.convert("RGB"), 64), 64))
    assert (d["x_train"][0] == want.transpose(2, 0, 1)).all()
    # The same tree at 32 (the schema's default) is 32; at 80, as it is.
    assert converted(big_tree, tmp_path, image_size=32)["x_train"].shape == (20, 3, 32, 32)
    same = converted(big_tree, tmp_path, image_size=80)["x_train"][0]
    with Image.open(big_tree / "train" / "c0" / "000.png") as img:
        assert (same == np.asarray(img).transpose(2, 0, 1)).all()


@pytest.mark.parametrize("data, error", [
    ({"image_size": 64}, r"data.image_size = 64, but cifar10 images are 32x32.*folder images "
                         r"only\); set data.image_size to 32"),
    ({"dataset": "cifar100", "image_size": 224}, r"data.image_size = 224, but cifar100"),
    ({"image_size": 4}, r"data.image_size: 4 is less than the minimum of 8"),
])
def test_an_image_size_a_dataset_cannot_give_is_refused(data, error):
    with pytest.raises(KdflowError, match=error):
        validate({"data": data})


def test_cifar_keeps_its_size_and_a_folder_takes_any(tmp_path):
    assert validate({"data": {"dataset": "cifar100"}})["data"]["image_size"] == 32
    assert validate({"data": {"dataset": "folder", "url": str(tmp_path),
                              "image_size": "96"}})["data"]["image_size"] == 96
    # The library refuses it too, before reading anything.
    with pytest.raises(KdflowError, match="cifar10 images are 32x32"):
        convert(tmp_path / "absent.tar.gz", tmp_path / "c.npz", image_size=64)


def test_an_image_listed_twice_is_refused(png_tree, tmp_path):
    archive = tmp_path / "dup.zip"
    pack(png_tree, archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # zipfile warns of the name it writes twice
        with zipfile.ZipFile(archive, "a") as z:
            z.writestr("mytree/train/c0/000.png", image_bytes(0, 5))
    fails(archive, tmp_path, r"dup.zip: mytree/train/c0/000.png: listed twice in the archive")


def test_a_tree_that_changes_between_listing_and_reading_is_refused(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "t", train=1, test=1, classes=["a", "b"])
    allocate = folder._Tree.allocate

    def then_add_an_image(self, scratch):
        allocate(self, scratch)
        (tree / "train" / "a" / "late.png").write_bytes(image_bytes(0, 9))

    monkeypatch.setattr(folder._Tree, "allocate", then_add_an_image)
    fails(tree, tmp_path, r"t/train/a/late.png: an image that was not there when the tree "
                          r"was listed: it changed during conversion; rerun")


def _sources(tree: Path, tmp_path: Path) -> list[Path]:
    pack(tree, tmp_path / "t.tar.gz")
    pack(tree, tmp_path / "t.zip")
    return [tree, tmp_path / "t.tar.gz", tmp_path / "t.zip"]


def test_images_are_counted_from_the_listing(big_tree, tmp_path, monkeypatch):
    # Clutter, and a README beside the tree, are not images conversion decodes.
    (big_tree.parent / "README.txt").write_text("not an image")
    (big_tree / "train" / "c0" / ".DS_Store").write_bytes(b"junk")

    def no_decoding(*args):
        raise AssertionError("an image was decoded while counting")

    monkeypatch.setattr(folder._Tree, "_decode", no_decoding)
    for source in _sources(big_tree, tmp_path):
        assert folder.count_images(source) == 30, source
    (big_tree / "train" / "c0" / ".DS_Store").unlink()


def test_a_tree_too_large_for_memory_or_disk_is_refused_before_decoding(big_tree, tmp_path,
                                                                          monkeypatch):
    # The pixels go to disk: memory holds the listing, disk the pixels twice.
    need = folder.memory_needed(30, 224)
    assert need == 30 * folder.PER_IMAGE_OVERHEAD + folder.WORKING_ROOM
    disk = folder.disk_needed(30, 224)
    assert disk == 2 * 30 * 3 * 224 * 224 + folder.WORKING_ROOM
    decoded = []
    monkeypatch.setattr(folder._Tree, "_decode", lambda *a: decoded.append(a))
    monkeypatch.setattr(folder, "available_memory", lambda: need - 1)
    for source in _sources(big_tree, tmp_path):
        fails(source, tmp_path,
              rf"30 images need {need:,} bytes \(.* GiB\) of memory to convert \(30 x "
              rf"{folder.PER_IMAGE_OVERHEAD:,} bytes for the listing, plus working room\), but "
              rf"only {need - 1:,} bytes .* is available; use fewer images", image_size=224)
    monkeypatch.setattr(folder, "available_memory", lambda: need)
    monkeypatch.setattr(folder, "free_disk", lambda d: disk - 1)
    for source in _sources(big_tree, tmp_path):
        fails(source, tmp_path,
              rf"30 images at data.image_size 224 need {disk:,} bytes \(.* GiB\) of disk in "
              rf".* to convert \(30 x 3 x 224 x 224 = {30 * 3 * 224 * 224:,} bytes .* of "
              rf"pixels, twice while the .npz is written\), but only {disk - 1:,} bytes .* is "
              r"free; free some space, lower data.image_size", image_size=224)
    assert not decoded
    # Exactly enough converts; so does an unknown amount (no probe on this system).
    monkeypatch.undo()
    for available, free in ((need, disk), (None, None)):
        monkeypatch.setattr(folder, "available_memory", lambda: available)
        monkeypatch.setattr(folder, "free_disk", lambda d: free)
        assert converted(big_tree, tmp_path, image_size=224)["x_test"].shape == (10, 3, 224, 224)
    # No scratch file is left beside the output.
    assert not list(tmp_path.glob(".kdflow-scratch-*"))


def test_the_memory_probe_reads_meminfo_and_every_cgroup_limit_over_it(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemAvailable:  8000000 kB\n")
    cgroups, own = tmp_path / "cgroup", tmp_path / "self"
    assert folder.available_memory(meminfo, cgroups, own) == 8_000_000 * 1024

    def group(path: str, limit: str, used: int, cache_key: str, cache: int, sub: str = ""):
        d = cgroups / sub / path
        d.mkdir(parents=True, exist_ok=True)
        (d / ("memory.max" if not sub else "memory.limit_in_bytes")).write_text(limit + "\n")
        (d / ("memory.current" if not sub else "memory.usage_in_bytes")).write_text(f"{used}\n")
        (d / "memory.stat").write_text(f"anon 5\n{cache_key} {cache}\n")

    # v2: the job's limit (3 GiB, 2 GiB used of which 0.5 GiB reclaimable
    # cache) binds, not its step's (none) or the mount's (none written).
    own.write_text("0::/job/step\n")
    group("job/step", "max", 10, "inactive_file", 0)
    group("job", str(3 << 30), 2 << 30, "inactive_file", 1 << 29)
    assert folder.available_memory(meminfo, cgroups, own) == (3 << 30) - (2 << 30) + (1 << 29)
    # v1 beside it: a tighter limit there wins; v1's "no limit" (~2**63) is none.
    own.write_text("0::/job/step\n4:memory:/ctr\n")
    group("ctr", str(1 << 30), 1 << 29, "total_inactive_file", 0, sub="memory")
    group("", str(2 ** 63 - 4096), 10, "total_inactive_file", 0, sub="memory")
    assert folder.available_memory(meminfo, cgroups, own) == 1 << 29
    # The host's own probe answers, or says it cannot.
    got = folder.available_memory()
    assert got is None or got > 0


@pytest.mark.parametrize("name", ["tree.tar.gz", "tree.zip"])
def test_archives_with_a_wrapping_directory_match_the_directory(png_tree, tmp_path, name):
    archive = tmp_path / name
    md5 = pack(png_tree, archive)
    out = tmp_path / "a.npz"
    convert(archive, out, dataset="folder", md5=md5)
    want = converted(png_tree, tmp_path)
    with np.load(out) as d:
        for k in ("x_train", "y_train", "x_test", "y_test", "classes"):
            assert (d[k] == want[k]).all(), k


# --------------------------------------------------------------------------
# Bad trees: each refused, naming the path
# --------------------------------------------------------------------------

def test_no_classes(tmp_path):
    (tmp_path / "t" / "train").mkdir(parents=True)
    fails(tmp_path / "t", tmp_path, r"t: no class directories under train/")


def test_class_missing_from_test(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    for p in (tree / "test" / "b").iterdir():
        p.unlink()
    (tree / "test" / "b").rmdir()
    fails(tree, tmp_path, r"t: class\(es\) \['b'\] have no directory under test/")


def test_extra_class_in_test(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    (tree / "test" / "c").mkdir()
    (tree / "test" / "c" / "x.png").write_bytes(image_bytes(0, 0))
    fails(tree, tmp_path, r"\['c'\] are under test/ but not under train/")


def test_empty_class(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    for p in (tree / "train" / "b").iterdir():
        p.unlink()
    fails(tree, tmp_path, r"t/train/b: an empty class directory")


def test_corrupt_image(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    (tree / "train" / "a" / "001.png").write_bytes(image_bytes(0, 1)[:60])
    fails(tree, tmp_path, r"t/train/a/001.png: unreadable or corrupt image")


def test_not_an_image_file(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    (tree / "train" / "a" / "notes.txt").write_text("hi")
    fails(tree, tmp_path, r"t/train/a/notes.txt: not a .png, .jpg or .jpeg file")


def test_a_link_out_of_a_directory_is_refused(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes(0, 9))
    (tree / "train" / "a" / "009.png").symlink_to(outside)
    fails(tree, tmp_path, "a link leads out of the tree")


@pytest.mark.parametrize("member, error", [
    ("../evil.png", r"member '../evil.png' has an absolute path or '..'"),
    ("/abs/train/a/x.png", r"member '/abs/train/a/x.png' has an absolute path"),
])
def test_hostile_member_names_are_refused(png_tree, tmp_path, member, error):
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(png_tree, arcname="tree")
        info = tarfile.TarInfo(member)
        payload = image_bytes(0, 0)
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    fails(archive, tmp_path, error)


def test_links_in_an_archive_are_refused(png_tree, tmp_path):
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(png_tree, arcname="tree")
        link = tarfile.TarInfo("tree/train/c0/zz.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    fails(archive, tmp_path, "zz.png is not a regular file")


def test_member_count_and_unpacked_size_are_capped(png_tree, tmp_path, monkeypatch):
    archive = tmp_path / "t.tar.gz"
    pack(png_tree, archive)
    monkeypatch.setattr("kdflow.data.folder.MAX_MEMBERS", 20)
    fails(archive, tmp_path, "more than 20 members")
    monkeypatch.setattr("kdflow.data.folder.MAX_MEMBERS", 10_000)
    monkeypatch.setattr("kdflow.data.folder.MAX_UNPACKED", 20_000)
    fails(archive, tmp_path, "unpacks to more than 20,000 bytes")


def test_two_wrapping_directories_are_refused(png_tree, tmp_path):
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(png_tree, arcname="one")
        t.add(png_tree, arcname="two")
    fails(archive, tmp_path, "both under 'one' and under 'two'")


def test_a_huge_tar_header_is_refused_before_it_is_read_whole(png_tree, tmp_path,
                                                                 monkeypatch):
    # tarfile reads a pax header or a GNU long name whole, before any
    # per-member check; the counting reader caps the bytes between members.
    monkeypatch.setattr("kdflow.data.folder.MAX_IMAGE_BYTES", 50_000)
    monkeypatch.setattr("kdflow.data.folder.HEADER_SLACK", 20_000)
    payload = image_bytes(0, 0)
    for fmt, info in ((tarfile.PAX_FORMAT, tarfile.TarInfo("tree/train/c0/pax.png")),
                      (tarfile.GNU_FORMAT, tarfile.TarInfo("tree/train/c0/" + "n" * 200_000))):
        if fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "x" * 200_000}
        info.size = len(payload)
        archive = tmp_path / "t.tar.gz"
        with tarfile.open(archive, "w:gz", format=fmt) as t:
            t.add(png_tree, arcname="tree")
            t.addfile(info, io.BytesIO(payload))
        assert archive.stat().st_size < 1_000_000
        fails(archive, tmp_path, r"t.tar.gz: more than 70,000 bytes between two members")
    # Honest headers pass: long pax names, under the same small caps.
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as t:
        t.add(png_tree, arcname="tree")
        info = tarfile.TarInfo("tree/train/c0/" + "long" * 60 + ".png")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    assert converted(archive, tmp_path)["x_train"].shape == (121, 3, 32, 32)


def _patched_zip(tree: Path, out: Path, header: bytes, offset: int, value: bytes) -> Path:
    """tree as a .zip with `value` written at `offset` into every header
    starting with `header` (the flags or method of each member)."""
    pack(tree, out)
    data = bytearray(out.read_bytes())
    i = data.find(header)
    while i >= 0:
        data[i + offset:i + offset + len(value)] = value
        i = data.find(header, i + 4)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("header, offset, value, error", [
    (b"PK\x01\x02", 8, b"\x01\x00", r"member mytree/test/c0/000.png is encrypted"),
    (b"PK\x01\x02", 10, b"\x06\x00", r"000.png uses a compression method Python cannot"),
    (b"PK\x03\x04", 0, b"XXXX", r"000.png is corrupt or unreadable \(BadZipFile"),
    (b"PK\x05\x06", 0, b"XXXX", r"t.zip: its directory is corrupt or unreadable|"
                                  r"archive truncated or corrupt"),
])
def test_bad_zip_members_are_refused_clearly(png_tree, tmp_path, header, offset, value, error):
    fails(_patched_zip(png_tree, tmp_path / "t.zip", header, offset, value), tmp_path, error)


# --------------------------------------------------------------------------
# Archives whose listing alone would cost memory (caps before allocations)
# --------------------------------------------------------------------------

# A conversion in a child process, its peak memory measured (tests.helpers.childmem).
CONVERT_IMPORTS = "from kdflow import KdflowError\nfrom kdflow.data.folder import read_folder\n"
CONVERT_BODY = r'''
try:
    images = read_folder(ARGS[0])
except KdflowError as e:
    report(error=str(e))
except MemoryError:
    report(error="MemoryError")
else:
    report(shape=list(images.x_train.shape))
'''


def convert_capped(archive: Path, tmp_path: Path) -> dict:
    return run_capped(CONVERT_IMPORTS, CONVERT_BODY, archive, cwd=tmp_path)


def test_a_zip_directory_over_the_member_cap_is_refused_before_it_is_read(tmp_path):
    # 2,000,001 entries, 94 MB: ZipFile() alone would take over 1 GB.
    archive = hostile_zip_directory(tmp_path / "t.zip", MAX_MEMBERS + 1)
    result = convert_capped(archive, tmp_path)
    assert result["peak"] < MAX_PEAK, f"peak {result['peak'] / 2**20:.0f} MiB"
    assert result.get("error", "").startswith(
        f"{archive} has more than 2,000,000 members (2,000,001 by its directory)"), result
    assert "\n" not in result["error"]


def test_a_zip_directory_holding_more_than_it_declares_is_refused(png_tree, tmp_path,
                                                                     monkeypatch):
    # The end record's count is not what ZipFile goes by: the entries are
    # counted as the directory is walked, before any member is read.
    monkeypatch.setattr("kdflow.data.folder.MAX_MEMBERS", 50)
    fails(hostile_zip_directory(tmp_path / "t.zip", 51, declared=3), tmp_path,
          r"t.zip has more than 50 members, the cap")
    # A directory larger than the file: refused as corrupt, nothing read.
    fails(hostile_zip_directory(tmp_path / "t.zip", 3, cd_size=1 << 40), tmp_path,
          r"t.zip: its directory is corrupt or unreadable \(BadZipFile: a central directory "
          r"of 1,099,511,627,776 bytes")


def test_a_zip_is_listed_in_parts_and_reads_the_same(png_tree, tmp_path, monkeypatch):
    archive = tmp_path / "t.zip"
    pack(png_tree, archive)
    want = converted(png_tree, tmp_path)
    # Parts of 7 entries, with plain and with zip64 end records, and behind a
    # self-extractor's stub (data before the zip).
    monkeypatch.setattr("kdflow.data.archives._ZIP_CHUNK", 7)
    stub = tmp_path / "sfx.zip"
    stub.write_bytes(b"#!/bin/sh\nexit 0\n" * 50 + archive.read_bytes())
    for limit in (0xFFFFFFFF, 0):
        monkeypatch.setattr("kdflow.data.archives._ZIP32_LIMIT", limit)
        for source in (archive, stub):
            got = converted(source, tmp_path)
            assert all((got[k] == want[k]).all() for k in ("x_train", "y_train", "x_test"))


def test_tar_members_are_not_kept_while_streaming(png_tree, tmp_path):
    # 600 members of 1 MiB each once parsed: 600 MiB of TarInfos if kept.
    archive = tar_with_long_names(png_tree, tmp_path / "t.tar.gz", copies=600)
    assert archive.stat().st_size < 2_000_000
    result = convert_capped(archive, tmp_path)
    assert result["peak"] < MAX_PEAK, f"peak {result['peak'] / 2**20:.0f} MiB"
    assert result.get("shape") == [120, 3, 32, 32], result


PEAK_IMPORTS = ("from kdflow.data.datasets import convert\n"
                "from kdflow.data.folder import read_folder\nfrom PIL import Image, ImageOps\n")
PEAK_BODY = r'''
before = peak_rss()
images = read_folder(ARGS[0], None, int(ARGS[1]))
read = peak_rss() - before
pixels = images.x_train.nbytes + images.x_test.nbytes
del images
convert(ARGS[0], "out.npz", dataset="folder", image_size=int(ARGS[1]))
report(read=read, convert=peak_rss() - before, pixels=pixels)
'''


def test_conversion_memory_does_not_grow_with_the_pixels(png_tree, tmp_path):
    # 160 images at 320x320 (49 MB of pixels) and at 480x480 (111 MB), each
    # image decoded and written to its place in a scratch file, then copied
    # into the .npz in chunks: the peak is an image and a few chunks, the
    # same at both sizes, and never a copy of the pixels.
    small = run_capped(PEAK_IMPORTS, PEAK_BODY, png_tree, 320, cwd=tmp_path)
    large = run_capped(PEAK_IMPORTS, PEAK_BODY, png_tree, 480, cwd=tmp_path)
    assert (small["pixels"], large["pixels"]) == (160 * 3 * 320 ** 2, 160 * 3 * 480 ** 2)
    for got in (small, large):
        assert got["read"] < 0.1 * got["pixels"], got
        assert got["convert"] < folder.memory_needed(160, 320), got
    assert large["convert"] < 0.4 * large["pixels"], large
    assert large["convert"] - small["convert"] < 0.1 * (large["pixels"] - small["pixels"]), \
        (small, large)


def test_class_directories_are_capped_as_they_come(png_tree, tmp_path, monkeypatch):
    monkeypatch.setattr("kdflow.data.folder.MAX_CLASSES", 9)
    # Whichever split comes first (a directory is walked in name order).
    fails(png_tree, tmp_path, r"more than 9 class directories under (test|train)/, the cap")
    for name in ("t.tar.gz", "t.zip"):
        pack(png_tree, tmp_path / name)
        fails(tmp_path / name, tmp_path, rf"{name}: more than 9 class directories under")


def test_skipped_tar_members_do_not_count_against_the_header_cap(png_tree, tmp_path,
                                                                   monkeypatch):
    # The Finder's AppleDouble files hold resource forks: two of 17 MiB in a
    # row once added up past the cap on bytes between two kept members.
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as t:
        t.add(png_tree, arcname="t")
        for name in ("t/train/c0/._000.png", "t/train/c0/._001.png"):
            info = tarfile.TarInfo(name)
            info.size = 17 << 20
            t.addfile(info, io.BytesIO(b"\0\5\x16\7" + bytes(info.size - 4)))
    want = converted(png_tree, tmp_path)
    got = converted(archive, tmp_path)
    assert all((got[k] == want[k]).all() for k in ("x_train", "y_train", "x_test"))
    # Skipped bytes are still read, and still count against the total cap.
    monkeypatch.setattr("kdflow.data.folder.MAX_UNPACKED", 30 << 20)
    (tmp_path / "capped").mkdir()
    fails(archive, tmp_path / "capped", r"t.tar.gz unpacks to more than 31,457,280 bytes")


def quadrants() -> np.ndarray:
    """32x32 RGB in four flat quadrants (red, green / blue, white), aligned
    to JPEG's blocks so the colours survive compression."""
    x = np.zeros((32, 32, 3), dtype=np.uint8)
    x[:16, :16], x[:16, 16:] = (255, 0, 0), (0, 255, 0)
    x[16:, :16], x[16:, 16:] = (0, 0, 255), (255, 255, 255)
    return x


# EXIF Orientation: the turn (np.rot90's k, counterclockwise) that shows the
# stored pixels upright. 6: the stored top row is the right-hand side.
@pytest.mark.parametrize("orientation, k", [(6, -1), (8, 1), (3, 2), (1, 0)])
def test_exif_orientation_is_applied(tmp_path, orientation, k):
    tree = make_tree(tmp_path / "t", train=1, test=1, classes=["a", "b"], fmt="JPEG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(quadrants()).save(tree / "train" / "a" / "000.jpg", "JPEG", exif=exif,
                                      quality=95)
    got = converted(tree, tmp_path)["x_train"][0].transpose(1, 2, 0).astype(int)
    want = np.rot90(quadrants(), k).astype(int)
    for rows in (slice(2, 14), slice(18, 30)):      # each quadrant, away from its edges
        for cols in (slice(2, 14), slice(18, 30)):
            assert np.abs(got[rows, cols].mean((0, 1)) - want[rows, cols].mean((0, 1))).max() \
                < 20, (orientation, rows, cols)


def test_everyday_clutter_is_skipped(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    want = converted(tree, tmp_path)
    (tree / "train" / "a" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / "a" / ".ipynb_checkpoints" / "x.txt").write_text("notebook")
    (tree / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    (tree / "train" / "b" / "Thumbs.db").write_bytes(b"\0\1")
    (tree / ".git").mkdir()
    (tree / "README.md").write_text("my cats")
    got = converted(tree, tmp_path)
    assert (got["x_train"] == want["x_train"]).all()
    # The Finder's Compress: a __MACOSX/ twin of the tree, full of ._ files.
    archive = tmp_path / "mac.zip"
    pack(tree, archive, wrapper="t")
    with zipfile.ZipFile(archive, "a") as z:
        for p in sorted(tree.rglob("*.png")):
            rel = p.relative_to(tree).as_posix()
            z.writestr(f"__MACOSX/t/{rel.rsplit('/', 1)[0]}/._{p.name}", b"\0\5\x16\7junk")
    got = converted(archive, tmp_path)
    assert (got["x_train"] == want["x_train"]).all()


def test_phone_jpegs_in_mpo_form_are_accepted(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"], fmt="JPEG")
    first = Image.open(io.BytesIO(image_bytes(0, 0, fmt="JPEG")))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[first.copy()])
    (tree / "train" / "a" / "000.jpg").write_bytes(buf.getvalue())
    assert Image.open(tree / "train" / "a" / "000.jpg").format == "MPO"
    assert converted(tree, tmp_path)["x_train"].shape == (4, 3, 32, 32)


def test_a_16_bit_png_is_refused(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    deep = np.full((32, 32), 40_000, dtype=np.uint16)
    Image.fromarray(deep).save(tree / "train" / "a" / "000.png")
    assert Image.open(tree / "train" / "a" / "000.png").mode.startswith("I")
    fails(tree, tmp_path, r"a/000.png: a 16-bit or 32-bit image \(Pillow mode I.*save it "
                          r"as an 8-bit PNG or a JPEG")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    os.mkfifo(tree / "train" / "a" / "002.png")
    fails(tree, tmp_path, r"a/002.png: not a regular file \(a FIFO")


# --------------------------------------------------------------------------
# Config and staleness
# --------------------------------------------------------------------------

def test_folder_needs_a_url_and_an_archive_needs_its_md5(png_tree, tmp_path):
    with pytest.raises(KdflowError, match="folder has no default source; set data.url"):
        validate({"data": {"dataset": "folder"}})
    with pytest.raises(KdflowError, match=r"is an archive, so data.md5 is required.*md5sum"):
        validate({"data": {"dataset": "folder", "url": "https://example.org/t.tar.gz"}})
    with pytest.raises(KdflowError, match="neither|does not end in"):
        validate({"data": {"dataset": "folder", "url": str(tmp_path / "nowhere")}})
    c = validate({"data": {"dataset": "folder", "url": png_tree.as_uri()}})
    assert archive_name("folder", c["data"]["url"]) is None
    assert archive_name("folder", "https://x/t.zip") == "folder.zip"


def test_a_folder_archive_is_fetched_and_verified_like_the_cifar_ones(png_tree, tmp_path):
    archive = tmp_path / "t.zip"
    md5 = pack(png_tree, archive)
    with pytest.raises(KdflowError, match="md5 mismatch"):
        fetch("folder", archive.as_uri(), "0" * 32, tmp_path / "folder.zip")
    assert not (tmp_path / "folder.zip").exists()
    fetch("folder", archive.as_uri(), md5, tmp_path / "folder.zip")
    assert converted(tmp_path / "folder.zip", tmp_path)["x_train"].shape == (120, 3, 32, 32)


def test_the_fingerprint_follows_edits(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    before = fingerprint("folder", str(tree))
    assert fingerprint("folder", tree.as_uri()) == before
    (tree / "train" / "a" / "002.png").write_bytes(image_bytes(0, 2))
    assert fingerprint("folder", str(tree)) != before
    assert fingerprint("cifar10", "https://example.org/c.tar.gz") == ""


def test_the_fingerprint_sees_only_what_conversion_reads(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    before = fingerprint("folder", str(tree))
    # Opening the folder in a file manager, notes beside the tree: no rerun.
    (tree / "train" / "a" / ".DS_Store").write_bytes(b"\0")
    (tree / "train" / "b" / "Thumbs.db").write_bytes(b"\0")
    (tree / ".ipynb_checkpoints").mkdir()
    (tree / "README.md").write_text("my cats")
    (tree / "originals").mkdir()
    (tree / "originals" / "big.png").write_bytes(b"raw")
    assert fingerprint("folder", str(tree)) == before
    # Editing an image: a rerun.
    (tree / "train" / "a" / "001.png").write_bytes(image_bytes(0, 5))
    edited = fingerprint("folder", str(tree))
    assert edited != before
    # A stray file inside a class, which conversion refuses: a rerun too.
    (tree / "train" / "a" / "notes.txt").write_text("hi")
    assert fingerprint("folder", str(tree)) != edited


def test_link_loops_and_links_out_are_not_walked(tmp_path):
    tree = make_tree(tmp_path / "t", train=2, test=1, classes=["a", "b"])
    # Two loops per class directory once made the walk exponential.
    for c in ("a", "b"):
        (tree / "train" / c / "up").symlink_to("..")
        (tree / "train" / c / "top").symlink_to("../..")
    (tree / "loop").symlink_to(".")         # beside the tree: harmless
    first = fingerprint("folder", str(tree))
    assert fingerprint("folder", str(tree)) == first
    # Conversion sees the same link and refuses it, naming it.
    fails(tree, tmp_path, r"t/train/a/top: a directory inside a class directory")
    for c in ("a", "b"):
        (tree / "train" / c / "up").unlink()
        (tree / "train" / c / "top").unlink()
    assert converted(tree, tmp_path)["x_train"].shape == (4, 3, 32, 32)
    # A link to / is refused before it is walked, at parse time too.
    (tree / "test" / "a" / "root").symlink_to("/")
    with pytest.raises(KdflowError, match=r"t/test/a/root: a link leads out of the tree"):
        fingerprint("folder", str(tree))
    (tmp_path / "again").mkdir()
    fails(tree, tmp_path / "again", r"t/test/a/root: a link leads out of the tree")


# --------------------------------------------------------------------------
# data.subset
# --------------------------------------------------------------------------

def test_subset_is_class_balanced_seeded_and_applies_to_test(png_tree, tmp_path):
    full = tmp_path / "full.npz"
    convert(png_tree, full, dataset="folder")
    a, b, c = (tmp_path / f"{n}.npz" for n in "abc")
    write_subset(full, a, train=53, test=20, seed=0)
    write_subset(full, b, train=53, test=20, seed=0)
    write_subset(full, c, train=53, test=20, seed=1)
    with np.load(a) as x, np.load(b) as y, np.load(c) as z, np.load(full) as f:
        counts = np.bincount(x["y_train"], minlength=10)
        assert counts.sum() == 53 and counts.max() - counts.min() <= 1
        assert np.bincount(x["y_test"]).tolist() == [2] * 10
        assert (x["x_train"] == y["x_train"]).all()            # fixed seed
        assert not (x["x_train"] == z["x_train"]).all()        # another seed, others
        assert (x["mean"] == f["mean"]).all()                  # the full set's statistics
    with pytest.raises(KdflowError, match="data.subset.test = 5 leaves some of the 10"):
        write_subset(full, tmp_path / "d.npz", train=0, test=5, seed=0)
    with pytest.raises(KdflowError, match="data.subset.train = 500 needs 50 train images"):
        balanced_pick(np.repeat(np.arange(10), 12), 500, np.random.default_rng(0),
                      "train", "data.subset.train")


def test_the_test_subset_does_not_depend_on_the_train_size(png_tree, tmp_path):
    full = tmp_path / "full.npz"
    convert(png_tree, full, dataset="folder")
    picks = []
    for train in (0, 20, 53, 100):
        out = tmp_path / f"s{train}.npz"
        write_subset(full, out, train=train, test=20, seed=3)
        with np.load(out) as d:
            picks.append(d["x_test"])
            assert np.bincount(d["y_test"]).tolist() == [2] * 10
    assert all((p == picks[0]).all() for p in picks[1:])


@pytest.mark.parametrize("subset, error", [
    ({"train": -1}, r"data.subset.train: -1 is less than the minimum of 0"),
    ({"train": 40}, r"data.subset.train = 40 leaves no training images beside"),
    ({"size": 3}, r"Additional properties are not allowed"),
    ({"test": "many"}, r"data.subset.test: 'many' is not of type 'integer'"),
])
def test_bad_subset_config(subset, error):
    with pytest.raises(KdflowError, match=error):
        validate({"data": {"subset": subset, "val_size": 50}})


def test_subset_defaults_to_all():
    assert validate({})["data"]["subset"] == {"train": 0, "test": 0}


# --------------------------------------------------------------------------
# The workflow, end to end, on a test-made tree
# --------------------------------------------------------------------------

def test_workflow_on_a_folder_at_64_pixels(tmp_path):
    # 80x80 photos trained at 64x64, a kdflow and a torchvision student, one
    # teacher shared by both seeds.
    tree = make_tree(tmp_path / "tree", train=20, test=5, size=80)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = base_config(tree, "")     # its data section is replaced here
    config["data"] = {"dataset": "folder", "url": str(tree), "val_size": 50,
                      "subset": {"train": 150, "test": 40}, "image_size": 64}
    config["teacher"]["shared"] = True
    config["student"]["model"] = ["lightnn", "mobilenet_v3_small"]
    snakemake(workdir, config)
    res = workdir / "results"
    metrics = json.loads((res / "teacher" / "metrics.json").read_text())
    assert metrics["test_images"] == 40
    assert not (res / "data" / "folder.tar.gz").exists()  # read in place
    with np.load(res / "data" / "folder.npz") as d:
        assert len(d["y_train"]) == 200 and d["x_train"].shape[1:] == (3, 64, 64)
        # The preparation travels with the pixels (kdflow.data.preprocessing).
        assert json.loads(str(d["preprocessing"]))["resize"].startswith("shorter side to 64")
    for seed in (0, 1):
        for student in ("lightnn", "mobilenet_v3_small"):
            ckpt = checkpoint.load(res / f"seed{seed}" / student / "kd" / "T2_w0.25" / "model.pt")
            assert ckpt["image_size"] == 64 and ckpt["teacher"]["path"] == "results/teacher/model.pt"
    # LightNN at 64x64, by hand (MACs of convolutions and matrix products):
    # conv 3->16 at 64x64, conv 16->16 at 32x32, linear 16*16*16 -> 256 -> 10.
    light = json.loads((res / "seed0" / "lightnn" / "ce" / "metrics.json").read_text())
    assert light["macs_per_image"] == (64 * 64 * 16 * 3 * 9 + 32 * 32 * 16 * 16 * 9
                                       + 4096 * 256 + 256 * 10)
    report = (res / "report.html").read_text()
    assert "subset run" in report.lower()
    assert "one teacher shared by all 2 seeds" in report and "trained once, with seed 0" in report

    # Another subset: only the steps after conversion rerun.
    smaller = {**config, "data": {**config["data"], "subset": {"train": 120, "test": 40}}}
    jobs = planned_jobs(workdir, smaller)
    assert "convert" not in jobs and jobs["subset"] == 1 and jobs["split"] == 1
    assert jobs["train_teacher"] == 1
    # Another data.image_size: the conversion and everything after it.
    jobs = planned_jobs(workdir, {**config, "data": {**config["data"], "image_size": 48}})
    assert jobs["convert"] == 1 and jobs["subset"] == 1 and jobs["train_teacher"] == 1
    assert jobs["report"] == 1
    # Editing the tree reruns conversion (Snakemake cannot see inside it).
    (tree / "train" / "c3" / "000.png").write_bytes(image_bytes(3, 77))
    assert planned_jobs(workdir, config).get("convert") == 1
