"""Weight names (``yolov5s``) → official release files, downloaded once into a cache and checked by sha256."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from ..bundle import sha256_file
from ..errors import EdgeYoloError

RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/{name}.pt"

# sha256 of the official v7.0 release assets.
OFFICIAL_SHA256 = {
    "yolov5n": "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3",
    "yolov5s": "8b3b748c1e592ddd8868022e8732fde20025197328490623cc16c6f24d0782ee",
    "yolov5m": "61d933360ba5a7733a36764996c800287d973889d875227f5beedd2473a97a56",
    "yolov5l": "2f603b7354c25454d1270663a14d8ddc1eea98e5eebc1d84ce0c6e3150fa155f",
    "yolov5x": "9f27a794fa0308e2606f90565164571d6f0a0ba18a3ce2e5e5d323b71c157859",
    "yolov5n6": "496c05a2b991da15acc6c4408c63da287f2513a46c6756618776d4dd71170781",
    "yolov5s6": "95bda9019ada63f37338308d0c81a66047a6fbaba061abaff271ba9334cf2a6f",
    "yolov5m6": "7afe7fa0f29a8351467200a2a5a33c7996d1155ed6636c7edd8ca70b14951c64",
    "yolov5l6": "b357b77f646b0190912985937c44e2923441369d5fda69ba86da2aa919212618",
    "yolov5x6": "257c991b216d625427dc4d9c7c76d6c6d93cf3732797538da34bdc02f97bfef0",
}

CACHE_ENV = "EDGEYOLO_CACHE"


def cache_dir() -> Path:
    """``$EDGEYOLO_CACHE`` or ``~/.cache/edgeyolo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeyolo")


def resolve_weights(spec: str | Path) -> Path:
    """A local path as is; a known name (``yolov5s`` or ``yolov5s.pt``) from the cache, downloading once."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    name = path.name.removesuffix(".pt")
    if str(spec) != path.name and str(spec) != name:
        raise EdgeYoloError(f"{spec}: no such weights file")
    if name not in OFFICIAL_SHA256:
        raise EdgeYoloError(
            f"{spec}: not a file and not a known weight name (known: {', '.join(OFFICIAL_SHA256)})"
        )
    return fetch_file(RELEASE_URL.format(name=name), cache_dir() / "weights" / f"{name}.pt", OFFICIAL_SHA256[name])


def fetch_file(url: str, dest: Path, sha256: str) -> Path:
    """Download ``url`` to ``dest`` once (atomically), verifying ``sha256``; reuse a verified cached copy."""
    if dest.is_file():
        if sha256_file(dest) == sha256:
            return dest
        raise EdgeYoloError(f"{dest}: cached file has the wrong sha256; delete it to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        raise EdgeYoloError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)}); offline, place that file at {dest}"
        ) from None
    if sha256_file(tmp) != sha256:
        tmp.unlink(missing_ok=True)
        raise EdgeYoloError(f"{url}: downloaded file has the wrong sha256 (expected {sha256})")
    tmp.replace(dest)
    return dest
