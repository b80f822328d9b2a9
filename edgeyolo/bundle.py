"""The bundle folder: engine files + ``manifest.json``, written atomically, verified on load.

A bundle is trusted only for what it holds: it is verified as a closed set. The manifest
must pass its schema and its own digest (``edgeyolo.manifest``); every file in the folder
is listed in ``checksums`` (no missing, no extra files), names stay inside the folder, and
nothing in it is a symlink. The one exception is ``engines/``: TensorRT compiles engines on
the device after the build and caches them there (``backends/trt/cache.py``), each with a
sidecar holding its sha256 that the cache checks before use; unlisted files there are
accepted only with the cache's own names (``*.engine``, ``*.json``, ``calibration-*.cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeYoloError
from .manifest import BUNDLE_FORMAT, MAX_MANIFEST_BYTES, seal, validate_manifest
from .schema import loads_json
from .swap import clean_stale_building, current_umask, recover_parked, replace_dir

__all__ = ["BUNDLE_FORMAT", "MANIFEST", "Bundle", "BundleWriter", "is_bundle", "load_bundle", "sha256_file"]

MANIFEST = "manifest.json"
DEVICE_CACHE_DIR = "engines"
# what backends/trt/cache.py writes into engines/ on the device (and its in-flight temp files)
_DEVICE_CACHE_FILE = re.compile(r"^engines/(\.?[A-Za-z0-9_.+-]+\.(engine|json|cache)(\.\d+\.tmp)?)$")
MAX_FILES = 1000


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    def file(self, key: str) -> Path:
        """Path of the file the manifest names under ``backend.files[key]``."""
        files = self.manifest.get("backend", {}).get("files", {})
        if key not in files:
            raise EdgeYoloError(f"{self.path}: the manifest names no {key!r} file for the {self.backend} backend")
        return self.path / files[key]

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]["name"]

    @property
    def names(self) -> list[str]:
        return self.manifest["names"]

    def update_manifest(self, **sections) -> None:
        """Rewrite ``manifest.json`` in place (atomically, digest renewed) with extra sections, e.g. accuracy."""
        self.manifest.update(sections)
        self.manifest = seal(self.manifest)
        _write_json_atomic(self.path / MANIFEST, self.manifest)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle: schema, manifest digest and closed file set always; with ``verify`` every sha256 too."""
    from .backends import BACKENDS

    path = Path(path)
    if not path.exists():
        recover_parked(path)  # a build killed between its two renames
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise EdgeYoloError(f"{path}: not a bundle (no {MANIFEST})")
    manifest = validate_manifest(read_manifest(manifest_path), str(path), BACKENDS)
    bundle = Bundle(path=path, manifest=manifest)
    check_closed_set(bundle)
    if verify:
        verify_checksums(bundle)
    return bundle


def read_manifest(path: Path) -> dict:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgeYoloError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MB; not a bundle manifest")
    try:
        return loads_json(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeYoloError(f"{path}: corrupt manifest ({exc})") from None
    except RecursionError:
        raise EdgeYoloError(f"{path}: corrupt manifest (nested too deeply)") from None


def bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` as a relative POSIX name; a symlink or special file anywhere is refused."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            full = Path(folder) / name
            mode = os.lstat(full).st_mode
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise EdgeYoloError(f"{root}: {rel} is a symlink; a bundle holds only its own plain files")
            if name in files:
                if not stat.S_ISREG(mode):
                    raise EdgeYoloError(f"{root}: {rel} is not a regular file")
                found.append(rel)
        if len(found) > MAX_FILES:
            raise EdgeYoloError(f"{root}: more than {MAX_FILES} files; not a bundle")
    return sorted(found)


def check_closed_set(bundle: Bundle) -> None:
    """No file missing, none extra (but the device's engine cache), names inside the folder."""
    listed = set(bundle.manifest["checksums"])
    present = set(bundle_files(bundle.path)) - {MANIFEST}
    missing = sorted(listed - present)
    if missing:
        raise EdgeYoloError(f"{bundle.path}: bundle file {missing[0]} is missing")
    extra = sorted(n for n in present - listed if not _DEVICE_CACHE_FILE.match(n))
    if extra:
        raise EdgeYoloError(f"{bundle.path}: {extra[0]} is not part of the bundle (not in its checksums); "
                            "remove it or rebuild the bundle")


def verify_checksums(bundle: Bundle) -> None:
    for name, expected in bundle.manifest["checksums"].items():
        if sha256_file(bundle.path / name) != expected:
            raise EdgeYoloError(f"{bundle.path}: checksum mismatch for {name}: the file was modified or corrupted")


class BundleWriter:
    """Write a bundle into a temporary folder beside ``dest`` and move it into place on ``commit``.

    Used as a context manager: an exception (or leaving without ``commit``) removes the
    temporary folder, so a crash leaves the old bundle or none, never half of one. The
    folder is named ``.X.building-PID-*`` so a later build removes it if this process was
    killed; the commit is one atomic exchange where the OS has one (see ``edgeyolo.swap``).
    """

    def __init__(self, dest: str | Path):
        self.dest = Path(dest).resolve()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_building(self.dest)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.building-{os.getpid()}-", dir=self.dest.parent))
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, manifest: dict) -> Bundle:
        files = bundle_files(self.tmp)
        manifest = {**manifest, "format": BUNDLE_FORMAT}
        manifest["checksums"] = {name: sha256_file(self.tmp / name) for name in files if name != MANIFEST}
        manifest = seal(manifest)
        _write_json_atomic(self.tmp / MANIFEST, manifest)
        # mkdtemp made the folder 0700; a bundle gets the user's umask like any other output
        os.chmod(self.tmp, 0o777 & ~current_umask())
        if self.dest.exists():
            if not (self.dest / MANIFEST).is_file() and any(self.dest.iterdir()):
                raise EdgeYoloError(f"{self.dest}: exists and is not a bundle; refusing to replace it")
        replace_dir(self.tmp, self.dest)
        self.committed = True
        return Bundle(path=self.dest, manifest=manifest)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
