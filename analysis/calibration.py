"""Measure intervals that hold the true value as often as they say (not in the paper): split-conformal calibration.

Three kinds of interval for each implant measure (DR Eq. 1, BIC Eq. 2, BV/TV Eq. 3), side by side:

* ``plane_disagreement`` (:mod:`analysis.intervals`): the measure on the fused labels narrowed and widened by the
  planes' disagreement; a worst case with no stated coverage.
* ``ensemble_spread``: [min, max] of the measure over the ensemble's members (each fold model's own labels);
  also no stated coverage, and blind to a bias all members share.
* ``conformal``: from a calibration set of scans with known (HQ) labels, the errors e_i = ML_i − HQ_i of the
  measure; their median b corrects a bias (the ML values sit on one side of HQ), and the
  ⌈(n + 1)(1 − α)⌉-th smallest |e_i − b| is the half-width q: [ML − b − q, ML − b + q] holds the HQ value of a new
  scan from the same distribution with probability ≥ 1 − α (split conformal prediction; Vovk et al. 2005,
  Lei et al. 2018). ``conformal_normalised`` divides the scores by each scan's ensemble spread (half the
  member range) and multiplies q back by the new scan's: narrower where the members agree.

A calibration table (:class:`Calibration`, JSON) names its scans (ids and digests), α, and per measure the errors,
spreads, b and q; ``python -m analysis calibrate`` writes it, ``analysis.segment --calibration`` and Table 3 apply it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import typing as tp
from pathlib import Path

import numpy as np

from data.atomic import atomic_write_json

MEASURES = ("dr_mm_per_year", "bic_percent", "bv_tv_percent")
KINDS = ("plane_disagreement", "ensemble_spread", "conformal", "conformal_normalised")
DEFAULT_ALPHA = 0.1
CALIBRATION_FILE = "calibration.json"
FORMAT = 1
SPREAD_FLOOR = 1e-9  # a spread of 0 (all members agree) would give an infinite normalised score


def conformal_rank(n: int, alpha: float) -> int:
    """Split conformal: the rank ⌈(n + 1)(1 − α)⌉ of the score that bounds a new one with probability ≥ 1 − α."""
    check_alpha(alpha)
    return int(math.ceil((n + 1) * (1.0 - alpha) - 1e-12))


def min_calibration_scans(alpha: float) -> int:
    """The fewest calibration scans for a finite conformal interval at level 1 − α (9 at α = 0.1, 19 at 0.05)."""
    n = 1
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def conformal_quantile(scores: tp.Sequence[float], alpha: float) -> float:
    """The ⌈(n + 1)(1 − α)⌉-th smallest score; +inf when the set is too small for level 1 − α."""
    s = sorted(float(v) for v in scores if not math.isnan(float(v)))
    k = conformal_rank(len(s), alpha)
    return s[k - 1] if 1 <= k <= len(s) else math.inf


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha: must be a number in (0, 1), got {alpha!r}")


def member_spread(values: tp.Sequence[float]) -> float:
    """Half the range of a measure over the ensemble's members (the ``ensemble_spread`` interval's half-width)."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return (max(finite) - min(finite)) / 2.0 if len(finite) >= 2 else math.nan


@dataclasses.dataclass(frozen=True)
class MeasureCalibration:
    """One measure's calibration: errors e_i = ML_i − HQ_i, the members' spreads, the bias b and half-widths q."""

    errors: tuple[float, ...]
    spreads: tuple[float, ...]  # NaN where a scan had fewer than two members
    bias: float  # median of the errors: the ML values' systematic offset from HQ
    q_absolute: float  # conformal half-width of |e − b| (inf: too few scans)
    q_normalised: float  # of |e − b| / spread (NaN: no spreads)

    @classmethod
    def fit(cls, errors: tp.Sequence[float], spreads: tp.Sequence[float], alpha: float) -> MeasureCalibration:
        pairs = [(float(e), float(s)) for e, s in zip(errors, spreads) if not math.isnan(float(e))]
        if not pairs:
            return cls((), (), math.nan, math.inf, math.nan)
        errs = [e for e, _ in pairs]
        bias = float(statistics.median(errs))
        q_abs = conformal_quantile([abs(e - bias) for e in errs], alpha)
        normed = [abs(e - bias) / max(s, SPREAD_FLOOR) for e, s in pairs if not math.isnan(s)]
        q_norm = conformal_quantile(normed, alpha) if len(normed) == len(pairs) else math.nan
        return cls(tuple(errs), tuple(s for _, s in pairs), bias, q_abs, q_norm)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibration table: α, the scans it was made on, the model it belongs to, and each measure's fit."""

    alpha: float
    scans: tuple[dict, ...]  # {"id", "digest"} per calibration scan
    measures: dict[str, MeasureCalibration]
    model: str = ""
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.scans)

    def interval(self, measure: str, value: float, spread: float = math.nan,
                 kind: str = "conformal") -> tuple[float, float]:
        """The ``kind`` interval (``conformal`` or ``conformal_normalised``) of a new scan's ML ``value``."""
        return conformal_interval(self.measures[measure], value, spread, kind)

    def describe(self) -> str:
        return (f"split conformal, α = {self.alpha:g} ({100 * (1 - self.alpha):g} % intervals), calibrated on "
                f"{self.n} scan{'s' if self.n != 1 else ''}" + (f" ({self.note})" if self.note else ""))

    def to_json(self) -> dict:
        return {"format": FORMAT, "alpha": self.alpha, "model": self.model, "note": self.note,
                "scans": list(self.scans), "min_scans_for_alpha": min_calibration_scans(self.alpha),
                "measures": {k: {"errors": list(m.errors), "spreads": [_json_float(s) for s in m.spreads],
                                 "bias": _json_float(m.bias), "q_absolute": _json_float(m.q_absolute),
                                 "q_normalised": _json_float(m.q_normalised)} for k, m in self.measures.items()}}

    @classmethod
    def from_json(cls, doc: tp.Mapping[str, tp.Any], source: str = "calibration") -> Calibration:
        try:
            if int(doc.get("format", 0)) != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            alpha = float(doc["alpha"])
            check_alpha(alpha)
            measures = {k: MeasureCalibration(tuple(float(e) for e in m["errors"]),
                                              tuple(_from_json_float(s) for s in m["spreads"]),
                                              _from_json_float(m["bias"]), _from_json_float(m["q_absolute"]),
                                              _from_json_float(m["q_normalised"]))
                        for k, m in doc["measures"].items()}
            return cls(alpha, tuple(dict(s) for s in doc["scans"]), measures, str(doc.get("model", "")),
                       str(doc.get("note", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a calibration table of this project ({exc})") from None

    def write(self, path: Path) -> Path:
        atomic_write_json(Path(path), self.to_json(), indent=1)
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> Calibration:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot be read as a calibration table ({exc})") from None
        return cls.from_json(doc, str(path))


def _json_float(v: float) -> tp.Union[float, str, None]:
    v = float(v)
    return None if math.isnan(v) else ("inf" if math.isinf(v) else v)


def _from_json_float(v: tp.Any) -> float:
    return math.nan if v is None else (math.inf if v == "inf" else float(v))


def conformal_interval(cal: MeasureCalibration, value: float, spread: float = math.nan,
                       kind: str = "conformal") -> tuple[float, float]:
    """Split-conformal interval of an ML ``value``: centre ML − b, half-width q (``conformal``) or q × the scan's
    ensemble spread (``conformal_normalised``); (−inf, inf) where the calibration set is too small for α."""
    if kind not in ("conformal", "conformal_normalised"):
        raise ValueError(f"kind: must be conformal or conformal_normalised, got {kind!r}")
    value = float(value)
    if math.isnan(value) or math.isnan(cal.bias):
        return math.nan, math.nan
    half = cal.q_absolute if kind == "conformal" else cal.q_normalised * max(float(spread), SPREAD_FLOOR)
    if math.isnan(half):
        return math.nan, math.nan
    centre = value - cal.bias
    return centre - half, centre + half


def fit_calibration(records: tp.Sequence[tp.Mapping[str, tp.Any]], alpha: float = DEFAULT_ALPHA, *,
                    model: str = "", note: str = "") -> Calibration:
    """A calibration table from one record per calibration scan: {"id", "digest", "ml": {measure: v},
    "hq": {measure: v}, "members": {measure: [v per member]}} (members optional)."""
    check_alpha(alpha)
    if not records:
        raise ValueError("calibration: no scans")
    measures = {}
    for m in MEASURES:
        errors = [float(r["ml"][m]) - float(r["hq"][m]) for r in records]
        spreads = [member_spread(r.get("members", {}).get(m, ())) for r in records]
        measures[m] = MeasureCalibration.fit(errors, spreads, alpha)
    scans = tuple({"id": str(r["id"]), "digest": str(r.get("digest", ""))} for r in records)
    return Calibration(float(alpha), scans, measures, model, note)


def coverage(cal: Calibration, tests: tp.Sequence[tp.Mapping[str, tp.Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per measure and interval kind: the share of test scans whose HQ value lies inside (``coverage``), the mean
    width, and the mean width relative to the HQ value (``relative_width``). A test record carries what a
    calibration record does, plus ``plane`` {measure: [lo, hi]} (today's plane-disagreement interval)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in MEASURES:
        rows: dict[str, list[tuple[bool, float, float]]] = {k: [] for k in KINDS}
        for t in tests:
            hq, ml = float(t["hq"][m]), float(t["ml"][m])
            if math.isnan(hq) or math.isnan(ml):
                continue
            members = [float(v) for v in t.get("members", {}).get(m, ())]
            spread = member_spread(members)
            ivs = {"conformal": cal.interval(m, ml, spread, "conformal"),
                   "conformal_normalised": cal.interval(m, ml, spread, "conformal_normalised")}
            if "plane" in t and m in t["plane"]:
                ivs["plane_disagreement"] = tuple(float(v) for v in t["plane"][m])
            if len([v for v in members if not math.isnan(v)]) >= 2:
                ivs["ensemble_spread"] = (min(members + [ml]), max(members + [ml]))
            for k, (lo, hi) in ivs.items():
                if not (math.isnan(lo) or math.isnan(hi)):
                    rows[k].append((lo <= hq <= hi, hi - lo, (hi - lo) / abs(hq) if hq else math.nan))
        out[m] = {k: {"coverage": float(np.mean([c for c, _, _ in r])), "mean_width": float(np.mean([w for _, w, _ in r])),
                      "relative_width": float(np.nanmean([x for _, _, x in r])), "n": float(len(r))}
                  for k, r in rows.items() if r}
    return out


__all__ = ["MEASURES", "KINDS", "DEFAULT_ALPHA", "CALIBRATION_FILE", "Calibration", "MeasureCalibration",
           "conformal_rank", "conformal_quantile", "min_calibration_scans", "conformal_interval", "fit_calibration",
           "member_spread", "coverage", "check_alpha"]
