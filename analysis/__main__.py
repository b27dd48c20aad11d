"""``python -m analysis {reports,fig3,table2,table3,pareto,missing} [--tracking-uri URI] [--experiment NAME] [--out reports/]``

The paper's figures and tables rebuilt from MLflow:
  reports  everything the runs allow (Fig. 3 + configs.csv, Table 2, Table 3, Pareto front, missing.csv/.md);
           a part without runs is skipped with a one-line note
  fig3     Fig. 3: mean IoU vs FLOPs (depth, width, input size, compound) + configs.csv
  table2   Table 2: IoU per fusing method (mean ± SE over folds, ×100), and the 4-fold ensemble's rows
           (one value each) when fusing.ensemble=true was run
  table3   Table 3: DR, BIC, BV/TV per test sample for WF, HQ and ML segmentations (ML: the fold
           ensemble's prediction when there is one, else the mean over the folds; --ml-from)
  pareto   Pareto front of the +experiment=optuna trials (max mean IoU, min FLOPs)
  missing  the missing-run report alone
  calibrate  a calibration table for conformal measure intervals (python -m analysis calibrate --help)

Exit status: 0 done; 1 the single part asked for has no runs to build from; 2 the tracking store is
unreachable or the training experiment does not exist.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default="sqlite:///work/mlflow.db",
                        help="MLflow tracking URI (default: %(default)s, the sweeps' embedded default)")
    common.add_argument("--experiment", default="scaling-unet", help="training experiment (default: %(default)s)")
    common.add_argument("--fusing-experiment", default=None,
                        help="experiment of the fusing runs (default: <experiment>-fusing)")
    common.add_argument("--out", default="reports", help="output folder (default: %(default)s)")
    sub = ap.add_subparsers(dest="what", required=True)
    for name, text in (("reports", "everything the runs allow, and the missing-run report"),
                       ("fig3", "Fig. 3: mean IoU vs FLOPs + configs.csv"),
                       ("table2", "Table 2: IoU per fusing method"),
                       ("table3", "Table 3: DR, BIC, BV/TV per test sample (WF, HQ, ML)"),
                       ("pareto", "Pareto front of the Optuna trials"),
                       ("missing", "missing runs (missing.csv, missing.md)")):
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name in ("reports", "table2", "table3"):
            p.add_argument("--config-key", default=None,
                           help="config of Tables 2/3 (default: the only config with fusing runs, else the one with most)")
        if name in ("reports", "table3"):
            p.add_argument("--roi-um", type=float, default=100.0,
                           help="BV/TV region of interest: distance around the implant in µm (default: %(default)s)")
            p.add_argument("--calibration", default=None, type=Path,
                           help="a calibration table (python -m analysis calibrate): Table 3's ML rows get its "
                                "conformal intervals")
            p.add_argument("--ml-from", choices=("auto", "ensemble", "folds"), default="auto",
                           help="Table 3's ML row: the fold-ensemble run's prediction (ensemble), the mean over the "
                                "per-fold runs' predictions (folds), or the ensemble when there is one (auto, default)")
    return ap


def _report(part) -> None:
    for p in part.written:
        print(f"wrote {p}")
    if part.skipped:
        print(f"{part.name}: skipped, {part.skipped}")
    for n in part.notes:
        print(f"{part.name}: {n}")
    for w in part.warnings:
        print(f"warning: {w}", file=sys.stderr)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:  # its own options (models, scans): analysis.calibrate
        from analysis.calibrate import main as calibrate

        return calibrate(argv[1:])
    args = _parser().parse_args(argv)
    from analysis import reports as R
    from analysis.store import StoreError, read_runs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out}: an existing file, not a folder", file=sys.stderr)
        return 2
    if any(p.exists() and not p.is_dir() for p in out.parents):
        print(f"error: --out {out}: a parent path is a file, not a folder", file=sys.stderr)
        return 2
    calibration = None
    if getattr(args, "calibration", None) is not None:
        from analysis.calibration import Calibration

        try:
            calibration = Calibration.read(args.calibration)
        except ValueError as exc:
            print(f"error: --calibration {exc}", file=sys.stderr)
            return 2
    need_training = args.what not in ("table2", "table3")
    try:
        runs = read_runs(args.tracking_uri, args.experiment, args.fusing_experiment, need_training=need_training)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"read {len(runs.training)} training and {len(runs.fusing or [])} fusing runs in {runs.read_s:.2f} s "
          f"({runs.search_calls} search call(s))")
    if args.what == "reports":
        parts = R.build_reports(args.tracking_uri, args.experiment, args.fusing_experiment, args.out,
                                roi_um=args.roi_um, config_key=args.config_key, runs=runs, ml_from=args.ml_from,
                                calibration=calibration)
        for part in parts:
            _report(part)
        return 0
    if args.what == "fig3":
        part = R.fig3_part(runs, args.out)
    elif args.what == "table2":
        part, _ = R.table2_part(runs, args.out, args.config_key)
    elif args.what == "table3":
        part = R.table3_part(runs, args.out, args.config_key, roi_um=args.roi_um, ml_from=args.ml_from,
                             calibration=calibration)
    elif args.what == "pareto":
        part = R.pareto_part(runs, args.out)
    else:
        part = R.missing_part(runs, args.out)
    _report(part)
    if part.skipped:
        print(f"error: {part.name}: {part.skipped}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
