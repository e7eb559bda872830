"""torchvision's published weights by name, as teacher.init or student.init.

`{torchvision: IMAGENET1K_V1}` (a member of the architecture's weights
enum, or DEFAULT) names the weights torchvision publishes for the config's
architecture: `published` resolves it to torchvision's own URL and the
hash torchvision publishes with it, the first hex digits of the file's
SHA-256 in the file name (resnet18-f37072fd.pth), which torch.hub's
check_hash verifies and so does `fetch` here. Nothing is ever loaded
through torchvision or torch.hub: the file comes through kdflow's verified
download (kdflow.data.fetch) and is read as weights only
(kdflow.models.weights).

Where the bytes come from, first match wins: the config's `url` (a local
copy or a mirror: a path, file:// or http(s)://), else torch.hub's cache
($TORCH_HOME/hub/checkpoints/<file name>, where torchvision itself keeps
the file, so one downloaded once by torchvision serves offline), else
torchvision's URL. All three are checked against torchvision's hash: a copy
that differs is refused, never replaced by a download behind the user's
back.

Importing torchvision costs seconds, so only a config that names such
weights pays it (kdflow.workflow.config resolves them to refuse a name the
architecture lacks before any job starts).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from kdflow import KdflowError
from kdflow.data.fetch import fetch_archive

log = logging.getLogger(__name__)

# torch.hub's HASH_REGEX: the hash prefix in a weights file's name
# ("<name>-<hex digits>.<ext>").
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
# torch.hub accepts any length; below 8 digits (32 bits) a wrong file would
# pass too easily. Every file torchvision 0.29 publishes has 8 or more.
MIN_HASH_DIGITS = 8
KEYS = ("torchvision", "url")
# Slack over the file size torchvision publishes (meta["_file_size"], MB
# rounded to 3 decimals) for the download's size cap.
SIZE_SLACK = 1.05


@dataclass(frozen=True)
class Published:
    """Weights torchvision publishes, or a file a test registers as such."""

    name: str            # torchvision's full name, "ResNet18_Weights.IMAGENET1K_V1"
    arch: str            # the architecture they are for, "resnet18"
    url: str             # torchvision's URL
    sha256: str          # the hash prefix in the URL's file name
    classes: tuple[str, ...] = ()   # the head's classes (meta["categories"])
    normalisation: dict | None = None  # transforms()' {mean, std}
    image_size: int | None = None      # transforms()' crop size
    max_bytes: int | None = None

    @property
    def file(self) -> str:
        """The file name, under which torch.hub caches it."""
        return Path(urllib.parse.urlparse(self.url).path).name

    def record(self) -> dict:
        """What the rules' params and the init record keep: name, URL, hash."""
        return {"torchvision": self.name, "url": self.url, "sha256": self.sha256}


def hash_of(url: str) -> str:
    """The hash prefix in `url`'s file name, as torch.hub reads it."""
    name = Path(urllib.parse.urlparse(url).path).name
    found = HASH_IN_NAME.search(name)
    if not found or len(found.group(1)) < MIN_HASH_DIGITS:
        raise KdflowError(f"{name} carries no SHA-256 prefix in its name (<name>-<at least "
                          f"{MIN_HASH_DIGITS} hex digits>.pth, as torchvision's files do), so "
                          "kdflow cannot verify it: give the weights as {url, md5} instead")
    return found.group(1)


def register(url: str, *, name: str, arch: str, **known) -> Published:
    """Weights at `url` known as `name` for `arch`, their hash read from the
    file name as from torchvision's own URLs (how tests stand in a file of
    their own for a hub no test can reach)."""
    return Published(name=name, arch=arch, url=url, sha256=hash_of(url), **known)


def is_torchvision(spec) -> bool:
    """Whether an init value names torchvision weights (not {url, md5})."""
    return isinstance(spec, dict) and "torchvision" in spec


def published(arch: str, member: str) -> Published:
    """torchvision's weights `member` (IMAGENET1K_V1, ..., or DEFAULT) of
    architecture `arch`; one KdflowError line for a name it lacks."""
    import torchvision.models

    from kdflow.models import torchvision_zoo

    if arch not in torchvision_zoo.classification_names():
        raise KdflowError(f"torchvision publishes no weights for {arch} (one of kdflow's own "
                          "nets): name a torchvision architecture, or give the weights as "
                          "{url, md5}")
    enum = torchvision.models.get_model_weights(arch)
    names = [w.name for w in enum]
    if not names:
        raise KdflowError(f"torchvision publishes no weights for {arch}: give them as "
                          "{url, md5}, or leave init null")
    if member != "DEFAULT" and member not in names:
        raise KdflowError(f"torchvision's {arch} has no weights {member!r}: it has "
                          f"{', '.join(names)} (DEFAULT: {enum.DEFAULT.name})")
    weights = enum.DEFAULT if member == "DEFAULT" else enum[member]
    transforms = weights.transforms()
    size = weights.meta.get("_file_size")
    crop = getattr(transforms, "crop_size", None)
    return register(
        weights.url, name=f"{enum.__name__}.{weights.name}", arch=arch,
        classes=tuple(str(c) for c in weights.meta.get("categories") or ()),
        normalisation={"mean": [float(v) for v in transforms.mean],
                       "std": [float(v) for v in transforms.std]},
        image_size=int(crop[0]) if crop else None,
        # The published size (MB), with slack, bounds the download instead
        # of fetch's generic 1 GiB.
        max_bytes=int(size * 1e6 * SIZE_SLACK) + (1 << 20) if size else None)


def resolve(spec: dict, arch: str) -> Published:
    """An init value {torchvision: NAME, url?} for architecture `arch`."""
    return published(arch, spec["torchvision"])


def hub_cache(weights: Published) -> Path:
    """Where torch.hub (torchvision's download) keeps the file:
    $TORCH_HOME/hub/checkpoints/<file name>, torch's own default else."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / weights.file


def fetch(weights: Published, dest: str | os.PathLike, *, local: str | None = None,
          key: str = "init") -> str:
    """Copy `weights` to `dest`, verified against their SHA-256 prefix: from
    `local` (the config's url) if given, else from torch.hub's cache if the
    file is there, else from torchvision's URL. Returns the source used."""
    cached = hub_cache(weights)
    if local:
        source, fix = local, (f"point {key}.url at a copy of {weights.url}, or remove "
                              f"{key}.url to download it")
    elif cached.is_file():
        source, fix = str(cached), (f"delete {cached} (a damaged copy): torchvision's "
                                    f"download, or the next run, fetches it again")
    else:
        source, fix = weights.url, (f"fetch it again, or copy {weights.url} here and point "
                                    f"{key}.url at it")
    fetch_archive(source, None, dest, key=key, sha256=weights.sha256,
                  max_bytes=weights.max_bytes,
                  mismatch=f"It is not torchvision's {weights.name}: {fix}")
    log.info("%s: torchvision's %s (sha256 %s...) from %s", key, weights.name,
             weights.sha256, source)
    return source


def described(weights: Published) -> dict:
    """What the publisher says of the file beyond its tensors, for
    kdflow.models.weights.init_from: class names, normalisation, image size."""
    return {k: v for k, v in asdict(weights).items()
            if k in ("classes", "normalisation", "image_size") and v}


def init_source(training: dict) -> tuple[dict | None, dict | None]:
    """For a training section (a plan record's), the init record's source
    part and what the publisher says of the file (`described`): {url, md5}
    as given and None, or a torchvision name resolved for the section's
    model (its name, URL and hash, and the local copy if one was named)."""
    spec = training.get("init")
    if not is_torchvision(spec):
        return spec, None
    weights = resolve(spec, training["model"])
    local = {"local": spec["url"]} if spec.get("url") else {}
    return {**weights.record(), **local}, described(weights)
