"""Resolve ``detect``'s SOURCES arguments (files, folders, globs, videos, camera indices) into a checked list."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeYoloError
from .runtime.images import IMAGE_SUFFIXES, read_image

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "image", "video" or "camera" (path is then the index, e.g. Path("0"))
    explicit: bool  # named on the command line (an unreadable one is an error, not a warning)


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand every spec; explicit files are checked up front so nothing is half-done on a bad one."""
    sources: list[Source] = []
    for spec in specs:
        path = Path(spec)
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise EdgeYoloError(f"{spec}: the pattern matches no files")
            sources += [Source(p, _kind(p), False) for p in matches if _kind(p)]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not files:
                raise EdgeYoloError(f"{spec}: no images or videos in this folder")
            sources += [Source(p, _kind(p), False) for p in files]
        elif path.is_file():
            kind = _kind(path) or "image"
            if kind == "image":
                read_image(path)  # raises one clear line for a corrupt or non-image file
            else:
                check_video(path)
            sources.append(Source(path, kind, True))
        elif spec.isdigit():
            sources.append(Source(path, "camera", True))
        else:
            raise EdgeYoloError(f"{spec}: no such file or folder")
    if not sources:
        raise EdgeYoloError("no images or videos to process")
    return sources


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def check_video(path: Path) -> None:
    import cv2

    capture = cv2.VideoCapture(str(path))
    ok = capture.isOpened() and capture.read()[0]
    capture.release()
    if not ok:
        raise EdgeYoloError(f"{path}: not a readable video")

