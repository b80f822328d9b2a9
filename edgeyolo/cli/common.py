"""What every command shares: the group, one-line errors, consoles, progress bars, opening a model."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from .._optional import known_missing
from .._version import __version__
from ..errors import EdgeYoloError
from ..log import log
from ..progress import notes

# Tables keep their shape when piped to a file or a log.
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
out = Console() if sys.stdout.isatty() else Console(width=160)


class _OneLineErrors(click.Group):
    """Turn ``EdgeYoloError`` into one clear line on stderr and exit status 2 (1 for a failed accuracy gate)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeYoloError as exc:
            _fail(str(exc), getattr(exc, "exit_code", 2))
        except ModuleNotFoundError as exc:
            # the safety net under require(): an optional package imported without it
            message = known_missing(exc)
            if message is None:
                raise
            _fail(message, 2)
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


class _WarningHandler(logging.Handler):
    def emit(self, record):
        if record.name == notes.name:
            err.print(f"[dim]{escape(record.getMessage())}[/]", highlight=False, soft_wrap=True)
            return
        level = record.levelname.lower()
        style = {"warning": "yellow", "error": "red"}.get(level, "dim")
        err.print(f"[{style}]{level}:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeyolo")
@click.option("-v", "--verbose", is_flag=True, help="Also print detailed notes (what each step decided).")
def cli(verbose: bool):
    """Compile YOLOv5 detectors for edge targets, then detect, evaluate and benchmark them."""
    log.handlers[:] = [_WarningHandler()]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    notes.setLevel(logging.INFO)  # long steps say what they are doing, even without -v


class ImageSize(click.ParamType):
    """``--imgsz``: ``640`` (square), ``480,640`` or ``480x640`` (height, width) → ``(h, w)``."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().replace("x", ",").split(",")
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            size = ()
        if len(size) not in (1, 2) or min(size) <= 0:
            self.fail(f"{value!r} is not an image size: give 640, 480,640 or 480x640 (height, width)", param, ctx)
        return size * 2 if len(size) == 1 else size


IMGSZ = ImageSize()


@contextmanager
def progress_bar(label: str, total: int):
    """A rich progress bar on stderr; yields ``advance(n)``."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


def open_model(spec):
    """A bundle folder as is; weights are built into a cached cpu-fp32 bundle (torch is imported only then)."""
    from ..bundle import is_bundle, load_bundle

    if is_bundle(spec):
        return load_bundle(spec)
    from ..build import cached_reference_bundle

    return cached_reference_bundle(spec)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))
