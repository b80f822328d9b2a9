"""The ``edgeyolo`` command: click commands and progress bars; the work happens in the library.

One module per command group; importing them registers their commands on ``cli``.
"""

from . import deploy, optimize, qat, quant, report, run, train  # noqa: F401  (registers the commands)
from .common import cli


def main() -> None:
    cli(prog_name="edgeyolo")


__all__ = ["cli", "main"]
