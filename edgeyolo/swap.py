"""Replacing a folder atomically, and cleaning what killed builds left behind.

On Linux ``renameat2(RENAME_EXCHANGE)`` swaps the new folder with the old one in one step,
so there is no moment without the destination, even under ``kill -9``. Elsewhere (or on a
file system without it) the old folder is parked as ``.X.old-PID`` for the instant between
two renames; ``recover_parked`` puts it back when a dead build left it there.

Work folders carry the PID of the process that made them (``.X.building-PID-*``,
``edgeyolo-export-PID-*``), so the next build can remove those of processes that are gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_renameat2 = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        function = False
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
            except (AttributeError, OSError):
                function = False
        _renameat2 = function
    return _renameat2 or None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    function = _libc_renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def parked_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old-{os.getpid()}")


def replace_dir(new: Path, dest: Path) -> None:
    """Put folder ``new`` at ``dest``; an existing ``dest`` is swapped out and removed."""
    if not dest.exists():
        os.rename(new, dest)  # fails rather than replace a folder that appeared meanwhile (non-empty)
        return
    if exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
        return
    old = parked_name(dest)
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _dead_owner(name: str, pattern: re.Pattern) -> bool:
    match = pattern.match(name)
    return bool(match) and not pid_alive(int(match.group(1)))


def recover_parked(dest: Path) -> None:
    """Put back a bundle a killed build parked as ``.X.old-PID`` (only where ``X`` is missing)."""
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.old-(\d+)$")
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return
    for parked in sorted(siblings):
        if not _dead_owner(parked.name, pattern) or parked.is_symlink() or not parked.is_dir():
            continue
        if not os.path.lexists(dest):
            try:
                os.rename(parked, dest)
                continue
            except OSError:
                pass
        shutil.rmtree(parked, ignore_errors=True)


def clean_stale_building(dest: Path) -> list[Path]:
    """Remove ``.X.building-PID-*`` folders of dead processes (and recover a parked ``X``)."""
    dest = Path(dest)
    recover_parked(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.building-(\d+)-")
    return _remove_dead(dest.parent, pattern)


def clean_stale_temp(prefix: str, folder: str | Path | None = None) -> list[Path]:
    """Remove ``{prefix}PID-*`` folders of dead processes from the temp folder."""
    import tempfile

    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    return _remove_dead(Path(folder or tempfile.gettempdir()), pattern)


def _remove_dead(folder: Path, pattern: re.Pattern) -> list[Path]:
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if _dead_owner(entry.name, pattern) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def current_umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
