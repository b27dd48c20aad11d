"""``python -m analysis fig3 --tracking-uri URI --experiment NAME --out reports/``: the paper's figures from MLflow."""

from __future__ import annotations

import argparse
import sys
import typing as tp


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    f3 = sub.add_parser("fig3", help="Fig. 3: mean IoU vs FLOPs (depth, width, input size, compound)")
    f3.add_argument("--tracking-uri", default="sqlite:///work/mlflow.db")
    f3.add_argument("--experiment", default="scaling-unet")
    f3.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    from analysis.fig3 import plot_fig3
    from analysis.results import config_table

    try:
        table = config_table(args.tracking_uri, args.experiment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if table.empty:
        print(f"error: no FINISHED runs in experiment {args.experiment!r}", file=sys.stderr)
        return 2
    incomplete = table[table.n_folds < 4]
    for _, r in incomplete.iterrows():
        print(f"warning: c0={r.width} d={r.depth} IS={r.input_size}: only folds {r.folds} FINISHED", file=sys.stderr)
    for p in plot_fig3(table, args.out):
        print(f"wrote {p}")
    table.to_csv(f"{args.out}/configs.csv", index=False)
    print(f"wrote {args.out}/configs.csv ({len(table)} configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
