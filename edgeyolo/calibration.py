"""Calibration images for INT8 builds: where they come from, which are used, how they are preprocessed.

Every batch goes through the runtime's own letterbox (``runtime.preprocess``), so an
INT8 engine is calibrated on exactly what it will see at inference time.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import EdgeYoloError
from .log import log
from .runtime.images import IMAGE_SUFFIXES, read_image
from .runtime.preprocess import LetterboxSettings, letterbox, to_input

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_SIZE = 300
MIN_RECOMMENDED = 100


@dataclass
class CalibrationSet:
    """The sampled, readable calibration images, letterboxed once and kept as uint8."""

    source: str
    letterbox: LetterboxSettings
    images: list[Path]
    letterboxed: list[np.ndarray] = field(repr=False)
    image_hashes: list[str] = field(repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    candidates: int = 0
    seed: int = 0
    method: str = ""  # the quantiser's calibration method, set by the backend that uses the set

    def __len__(self) -> int:
        return len(self.letterboxed)

    def batches(self, layout: str = "NCHW", batch_size: int = 1) -> Iterator[np.ndarray]:
        """Float32 network inputs (0..1, RGB) exactly as the runtime prepares them."""
        for start in range(0, len(self.letterboxed), batch_size):
            chunk = self.letterboxed[start:start + batch_size]
            yield np.concatenate([to_input(image, layout) for image in chunk])

    def describe(self) -> dict:
        return {
            "source": self.source,
            "method": self.method,
            "images": len(self),
            "candidates": self.candidates,
            "skipped": len(self.skipped),
            "seed": self.seed,
            "images_sha256": images_digest(self.image_hashes),
            "preprocess": self.letterbox.to_dict(),
        }


def images_digest(hashes: list[str]) -> str:
    """One sha256 for a set of images: over the sorted per-image sha256 list, one per line."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def load_calibration(spec: str | Path, letterbox_settings: LetterboxSettings, size: int | None = None,
                     seed: int = 0, default_size: int = DEFAULT_SIZE) -> CalibrationSet:
    """Sample up to ``size`` readable images from ``spec`` (folder, list file or named set) and letterbox them.

    ``size=None`` means ``default_size`` (a target's own, or 300), or every image where there are
    fewer (with a warning). An explicit ``size`` larger than the usable images is an error.
    """
    if size is not None and size < 1:
        raise EdgeYoloError(f"--calib-size must be positive, not {size}")
    candidates = list_candidates(spec)
    wanted = default_size if size is None else size
    order = list(candidates)
    random.Random(seed).shuffle(order)
    images, boxed, hashes, skipped = [], [], [], []
    for path in order:
        if len(images) == wanted:
            break
        try:
            data = path.read_bytes()
            image = read_image(path)
        except (EdgeYoloError, OSError) as exc:
            skipped.append((str(path), str(exc)))
            continue
        images.append(path)
        boxed.append(letterbox(image, letterbox_settings)[0])
        hashes.append(hashlib.sha256(data).hexdigest())
    if skipped:
        log.warning("calibration: skipped %d unreadable file(s), e.g. %s", len(skipped), skipped[0][0])
    if not images:
        raise EdgeYoloError(f"{spec}: no readable calibration images ({len(candidates)} files, all unreadable)")
    if len(images) < wanted:
        if size is not None:
            raise EdgeYoloError(
                f"{spec}: only {len(images)} usable calibration images, but --calib-size {size} was requested"
            )
        log.warning("calibration: only %d usable images in %s (default is %d); using all of them",
                    len(images), spec, default_size)
    if len(images) < MIN_RECOMMENDED:
        log.warning("calibrating on %d images; %d or more give more reliable INT8 ranges", len(images), MIN_RECOMMENDED)
    source = str(Path(spec).resolve()) if Path(spec).exists() else str(spec)  # a named set stays a name
    return CalibrationSet(source=source, letterbox=letterbox_settings, images=images, letterboxed=boxed,
                          image_hashes=hashes, skipped=skipped, candidates=len(candidates), seed=seed)


def list_candidates(spec: str | Path) -> list[Path]:
    """Image paths named by ``spec``, sorted: a folder (recursive), a text file of paths, or a named set."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EdgeYoloError(f"{path}: no image files in this folder")
        return files
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [path]
        return _read_list_file(path)
    if not any(sep in str(spec) for sep in "/\\") and named_set_file(str(spec)).is_file():
        return list_candidates(fetch_named_set(str(spec)))
    raise EdgeYoloError(f"{spec}: no such calibration folder, list file or named set (named: {', '.join(named_sets())})")


def _read_list_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise EdgeYoloError(f"{path}: not a text file listing image paths") from None
    files = [(path.parent / line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    if not files:
        raise EdgeYoloError(f"{path}: lists no image paths")
    return files


def named_sets() -> list[str]:
    from .targets import data_dir

    return sorted(p.stem for p in data_dir("calibration").glob("*.toml"))


def named_set_file(name: str) -> Path:
    from .targets import data_dir

    return data_dir("calibration") / f"{name}.toml"


def fetch_named_set(name: str) -> Path:
    """The image folder of a named set in the cache, downloading and unpacking it once."""
    from .model.weights import cache_dir

    spec = tomllib.loads(named_set_file(name).read_text())
    root = cache_dir() / "calibration"
    folder = root / name
    if folder.is_dir() and any(folder.rglob("*.jpg")):
        _check_named_set(folder, spec)
        return folder
    archive = root / Path(spec["url"]).name
    if not archive.is_file():
        _download(spec["url"], archive, folder)
    tmp = root / f".{name}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unpack(archive, tmp)
        _check_named_set(tmp, spec)
        tmp.rename(folder)
    finally:  # a failed unpack or check leaves no half-unpacked folder behind
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


MAX_ARCHIVE_BYTES = 4 << 30  # unpacked
MAX_ARCHIVE_MEMBERS = 100_000


def _unpack(archive: Path, dest: Path) -> None:
    """Extract a zip after checking its declared sizes (no zip bomb); zipfile keeps names inside ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS or sum(m.file_size for m in members) > MAX_ARCHIVE_BYTES:
                raise EdgeYoloError(f"{archive}: unpacks to more than {MAX_ARCHIVE_BYTES >> 30} GB or "
                                    f"{MAX_ARCHIVE_MEMBERS} files; refusing it")
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise EdgeYoloError(f"{archive}: not a valid zip archive ({exc}); delete it and try again") from None


def _check_named_set(folder: Path, spec: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    digest = images_digest([hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    if digest != spec["images_sha256"]:
        raise EdgeYoloError(
            f"{folder}: images do not match the {spec['name']} set (content sha256 {digest[:12]}..., "
            f"expected {spec['images_sha256'][:12]}...); delete the folder to fetch it again"
        )


def _download(url: str, archive: Path, folder: Path) -> None:
    import urllib.error
    import urllib.request

    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise EdgeYoloError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)}); offline, place that zip at {archive} "
            f"or its images in {folder}"
        ) from None
    part.replace(archive)
