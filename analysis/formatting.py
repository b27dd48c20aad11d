"""Shared output of the analysis tables: LaTeX escaping, mean ± SE cells, and the CSV / Markdown / LaTeX files
written atomically."""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import pandas as pd

from data.atomic import atomic_write_text


def cell(mean: float, se: float, fmt: str, pm: str) -> str:
    """``mean`` ± ``se`` as text (``mean`` alone when the SE is NaN, "–" when the mean is)."""
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}}" if math.isnan(se) else f"{mean:{fmt}}{pm}{se:{fmt}}"


_TEX_UNICODE = (("×", r"$\times$"), ("²", r"$^2$"), ("±", r"$\pm$"), ("µ", r"$\mu$"), ("−", "$-$"), ("–", "--"),
                ("∈", r"$\in$"), ("⟨", r"$\langle$"), ("⟩", r"$\rangle$"), ("α", r"$\alpha$"))


def tex_unicode(text: str) -> str:
    """The few non-ASCII characters the tables use, as LaTeX (pdflatex-safe)."""
    for a, b in _TEX_UNICODE:
        text = text.replace(a, b)
    return text


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (and :func:`tex_unicode`)."""
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return tex_unicode(text)


def atomic_write_csv(df: pd.DataFrame, path: tp.Union[str, Path]) -> Path:
    """``df`` as CSV (no index) to ``path``, atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def write_table_files(out_dir: tp.Union[str, Path], stem: str, df: pd.DataFrame, markdown: str, latex: str
                      ) -> list[Path]:
    """``<stem>.csv`` (``df``), ``<stem>.md`` and ``<stem>.tex`` in ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    return [atomic_write_csv(df, out_dir / f"{stem}.csv"),
            atomic_write_text(out_dir / f"{stem}.md", markdown),
            atomic_write_text(out_dir / f"{stem}.tex", latex)]
