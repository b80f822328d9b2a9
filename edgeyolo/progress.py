"""Progress notes for the long steps (export, calibration images, a backend's conversion).

The library only logs them on ``edgeyolo.progress``; the CLI shows them on stderr, so a
minute-long INT8 build says what it is doing, and a Python caller hears nothing unless it asks.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

notes = logging.getLogger("edgeyolo.progress")


def note(message: str, *args) -> None:
    notes.info(message, *args)


@contextmanager
def step(what: str):
    """Say ``what`` is starting, then how long it took (nothing more when it fails: the error says why)."""
    notes.info("%s ...", what)
    start = time.perf_counter()
    yield
    notes.info("%s: done in %.1f s", what, time.perf_counter() - start)
