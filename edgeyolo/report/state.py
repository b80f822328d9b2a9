"""The report's progress on disk (``state.json``), saved after every measured step so ``--resume`` can continue."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import EdgeYoloError

STATE = "state.json"


class ReportState:
    """Per cell: the bundle (or build error), accuracy, and the benchmark rounds measured so far."""

    def __init__(self, root: Path, config: dict, cells: dict | None = None):
        self.root, self.config, self.cells = root, config, cells or {}

    @classmethod
    def open(cls, root: Path, config: dict, resume: bool) -> "ReportState":
        path = root / STATE
        if not resume or not path.is_file():
            return cls(root, config)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeYoloError(f"{path}: cannot resume from a damaged state file ({exc}); rerun without --resume")
        if saved.get("config") != config:
            raise EdgeYoloError(f"{path}: was made with other models, targets, sizes, data or bench settings; "
                                "rerun without --resume")
        return cls(root, config, saved.get("cells", {}))

    def cell(self, cell_id: str) -> dict:
        return self.cells.setdefault(cell_id, {})

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"config": self.config, "cells": self.cells}, f, indent=1)
        os.replace(tmp, self.root / STATE)
