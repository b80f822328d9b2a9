"""The bundle folder: engine files + ``manifest.json``, written atomically, verified on load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeYoloError

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "edgeyolo-bundle/1"


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
        return self.path / self.manifest["backend"]["files"][key]

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
        """Rewrite ``manifest.json`` in place (atomically) with extra sections, e.g. measured accuracy."""
        self.manifest.update(sections)
        _write_json_atomic(self.path / MANIFEST, self.manifest)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle; with ``verify`` check the format and every file's sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise EdgeYoloError(f"{path}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeYoloError(f"{manifest_path}: corrupt manifest ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise EdgeYoloError(f"{path}: unsupported bundle format {manifest.get('format')!r} (expected {BUNDLE_FORMAT})")
    bundle = Bundle(path=path, manifest=manifest)
    if verify:
        verify_checksums(bundle)
    return bundle


def verify_checksums(bundle: Bundle) -> None:
    for name, expected in bundle.manifest.get("checksums", {}).items():
        file = bundle.path / name
        if not file.is_file():
            raise EdgeYoloError(f"{bundle.path}: bundle file {name} is missing")
        if sha256_file(file) != expected:
            raise EdgeYoloError(f"{bundle.path}: checksum mismatch for {name}: the file was modified or corrupted")


class BundleWriter:
    """Write a bundle into a temporary folder beside ``dest`` and move it into place on ``commit``.

    Used as a context manager: an exception (or leaving without ``commit``) removes the
    temporary folder, so a crash leaves the old bundle or none, never half of one.
    """

    def __init__(self, dest: str | Path):
        self.dest = Path(dest).resolve()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.building-", dir=self.dest.parent))
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, manifest: dict) -> Bundle:
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {**manifest, "format": BUNDLE_FORMAT}
        manifest["checksums"] = {str(p.relative_to(self.tmp)): sha256_file(p) for p in files}
        _write_json_atomic(self.tmp / MANIFEST, manifest)
        old = None
        if self.dest.exists():
            if not (self.dest / MANIFEST).is_file() and any(self.dest.iterdir()):
                raise EdgeYoloError(f"{self.dest}: exists and is not a bundle; refusing to replace it")
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            self.dest.rename(old)
        self.tmp.rename(self.dest)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Bundle(path=self.dest, manifest=manifest)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
