"""One exception type for bad input, so every message names the file and the field."""

from __future__ import annotations

import os
import typing as tp


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``<file>: <field>: <problem>``."""

    def __init__(self, path: tp.Union[str, os.PathLike, None], field: tp.Optional[str], problem: str):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.problem = problem
        parts = [p for p in (self.path, field) if p]
        super().__init__(": ".join(parts + [problem]))
