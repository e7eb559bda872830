"""The memory probe: what converting a tree of images holds, and what this process can still take.

An image tree is refused before its first image is decoded when it would
not fit (kdflow.data.folder counts the images from the listing). Its pixels
go to disk, not memory: `memory_needed` is the conversion's peak (the
listing and working room), `available_memory` the kernel's MemAvailable or
less where a memory cgroup (a container's, a Slurm job's) leaves less, and
`check_memory` compares the two; `disk_needed` and `check_disk` do the same
for the scratch file and the .npz.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdflow import KdflowError

# Held besides the pixels: per image, its name and place from the listing
# (a few hundred bytes); once, the image being decoded at its own size (up
# to kdflow.data.images.MAX_PIXELS, in a few copies as it is turned,
# converted and resized) and the channel statistics' float64 chunks.
PER_IMAGE_OVERHEAD = 1 << 10
WORKING_ROOM = 256 << 20


def memory_needed(images: int, image_size: int) -> int:
    """Bytes converting `images` images to image_size x image_size holds at
    its peak: no pixels (each image is decoded and written to its place in
    a scratch file on disk, which is then copied into the .npz in chunks,
    kdflow.data.store), only the listing's per-image record and the room
    above. `image_size` is the converters' common signature: the memory no
    longer depends on it."""
    return images * PER_IMAGE_OVERHEAD + WORKING_ROOM


def disk_needed(images: int, image_size: int) -> int:
    """Bytes of disk converting takes beside the output's directory: the
    pixels twice at the peak (the scratch file and the .npz being written),
    with the room above for the .npz's labels and headers."""
    return 2 * images * 3 * image_size * image_size + WORKING_ROOM


def free_disk(directory: Path) -> int | None:
    """Bytes free for this user in `directory` (None where it cannot be told)."""
    import shutil

    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def available_memory(meminfo: Path = Path("/proc/meminfo"),
                     cgroups: Path = Path("/sys/fs/cgroup"),
                     own: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, or
    less where a memory cgroup (v2 or v1; a container's, a Slurm job's)
    leaves less; None where none of it can be read (not Linux)."""
    rooms = []
    try:
        rooms.append(next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                          if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            rooms.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    rooms += _cgroup_rooms(cgroups, own)
    return min(rooms) if rooms else None


# (directory under the cgroup mount, limit, usage, the page cache the kernel
# reclaims before it refuses memory) for cgroup v2 and v1.
_CGROUP_FILES = (("", "memory.max", "memory.current", "inactive_file"),
                 ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                  "total_inactive_file"))


def _cgroup_rooms(cgroups: Path, own: Path) -> list[int]:
    """What each memory limit over this process leaves: its own cgroup's
    and its ancestors' up to the mount (inside a container, the mount is
    the container's own cgroup)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    rooms = []
    for sub, limit, usage, cache in _CGROUP_FILES:
        mount = cgroups / sub
        here = mount / _own_cgroup(lines, sub).strip().lstrip("/")
        for d in (here, *here.parents):
            room = _cgroup_room(d, limit, usage, cache)
            if room is not None:
                rooms.append(room)
            if d == mount:
                break
    return rooms


def _own_cgroup(lines: list[str], sub: str) -> str:
    """This process's cgroup in /proc/self/cgroup's lines: "0::/path" for
    v2, "4:memory:/path" for v1's memory controller ("/" if not listed)."""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" if not sub else sub in parts[1].split(",")):
            return parts[2]
    return "/"


def _cgroup_room(d: Path, limit: str, usage: str, cache: str) -> int | None:
    """What the limit in cgroup directory `d` leaves (None: no limit there),
    its reclaimable page cache counted as free."""
    try:
        text = (d / limit).read_text().strip()
        if text == "max" or int(text) >= 1 << 60:     # v1 writes "no limit" as ~2**63
            return None
        room = int(text) - int((d / usage).read_text())
    except (OSError, ValueError):
        return None
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache:
                room += int(value)
    except (OSError, ValueError):
        pass
    return max(0, room)


def check_memory(source: Path, images: int, image_size: int,
                 available: int | None) -> None:
    """Refuse a tree whose listing would not fit in memory, naming the numbers."""
    need = memory_needed(images, image_size)
    if available is None or need <= available:
        return
    raise KdflowError(
        f"{source}: {images:,} images need {_bytes(need)} of memory to convert "
        f"({images:,} x {PER_IMAGE_OVERHEAD:,} bytes for the listing, plus working room), "
        f"but only {_bytes(available)} is available; use fewer images in the tree, or "
        "convert on a machine with more memory")


def check_disk(source: Path, images: int, image_size: int, directory: Path,
               free: int | None) -> None:
    """Refuse a tree whose converted images would not fit on the disk of
    `directory` (where the scratch file and the .npz go)."""
    need = disk_needed(images, image_size)
    if free is None or need <= free:
        return
    pixels = images * 3 * image_size * image_size
    raise KdflowError(
        f"{source}: {images:,} images at data.image_size {image_size} need {_bytes(need)} "
        f"of disk in {directory} to convert ({images:,} x 3 x {image_size} x {image_size} "
        f"= {_bytes(pixels)} of pixels, twice while the .npz is written), but only "
        f"{_bytes(free)} is free; free some space, lower data.image_size (the pixels "
        "grow with its square) or use fewer images in the tree")


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 30):.2f} GiB)"
