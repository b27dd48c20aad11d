"""Benchmark: the paper's implant measures (Table 3, HQ row) of synthetic test explants, against the paper's ranges.

Generates the test explants of ``data.synth`` in process, exactly as ``write_dataset`` does for a dataset of
``--n-train`` training and ``--k`` test samples at each ``--seeds`` seed (seed = (dataset seed, sample index), the
test samples' alloy, beamline and implantation days from ``sample_plan``; with the defaults the first three test
samples of seed 0 are the demo's test samples), and measures each HQ label like ``analysis.table3`` does (DR Eq. 1
from the manifest's initial volume, surface and days; BIC Eq. 2; BV/TV Eq. 3 in a 100 µm ROI). Prints per sample
DR, BIC, BV/TV, the class voxel fractions, the degradation layer's mean thickness (DL voxels / initial screw
surface in voxel faces), the generation time and the DR bound (the DR of the sample with its whole screw degraded,
initial volume / (initial surface × time): no degradation measures more), then min / median / max per quantity as
a markdown table, and how many values fall in the paper's Table 3 HQ ranges (DR 0.209–0.462 mm/year, BIC
45.14–80.22 %, BV/TV 39.64–54.93 %). ``--json`` writes the rows and the summary.

    python benchmarks/synth_measures.py [--size 64] [--degradation-scale 2.5] [--seeds 0 1 2] [--k 7]
                                        [--n-train 14] [--voxel-size-um 5] [--roi-um 100] [--json OUT.json]

The defaults are the demo's (conf/profile/laptop.yaml: 64³, degradation scale 2.5, 5 µm voxels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from analysis.measures import implant_measures  # noqa: E402
from data.synth import sample_plan  # noqa: E402
from data.synth_explant import GENERATOR_VERSION, generate_explant  # noqa: E402

# The paper's Table 3, HQ row: the three test samples' values (min, max).
PAPER = {"dr_mm_per_year": (0.209, 0.462), "bic_percent": (45.14, 80.22), "bv_tv_percent": (39.64, 54.93)}
CLASSES = ("bg", "bone", "dl", "rm")
COLUMNS = ("dr_mm_per_year", "dr_bound_mm_per_year", "bic_percent", "bv_tv_percent", "frac_bg", "frac_bone",
           "frac_dl", "frac_rm", "dl_thick_vox", "seconds")


def measure_sample(size: int, seed: int, p: dict, *, voxel_size_um: float, degradation_scale: float,
                   roi_um: float) -> dict:
    t0 = time.perf_counter()
    ex = generate_explant(size, (seed, p["index"]), beamline=p["beamline"], alloy=p["alloy"], days=p["days"],
                          voxel_size_um=voxel_size_um, degradation_scale=degradation_scale)
    seconds = time.perf_counter() - t0
    # the manifest's rounding (data.synth.write_dataset)
    v0, a0 = float(f"{ex.initial_volume_mm3:.10g}"), float(f"{ex.initial_surface_mm2:.10g}")
    m = implant_measures(ex.label_hq, voxel_size_um=voxel_size_um, roi_um=roi_um, initial_volume_mm3=v0,
                         initial_surface_mm2=a0, days=p["days"])
    counts = np.bincount(ex.label_hq.ravel(), minlength=4)[:4] / ex.label_hq.size
    row = {"seed": seed, "index": p["index"], "alloy": p["alloy"], "beamline": p["beamline"], "days": p["days"],
           "dr_mm_per_year": m["dr_mm_per_year"],
           # the DR of the whole screw degraded: no sample of this geometry and time can measure more
           "dr_bound_mm_per_year": v0 / (a0 * p["days"] / 365.25),
           "bic_percent": m["bic_percent"], "bv_tv_percent": m["bv_tv_percent"],
           **{f"frac_{c}": float(x) for c, x in zip(CLASSES, counts)},
           "dl_thick_vox": float(np.count_nonzero(ex.label_hq == 2) / ex.initial_surface_vox), "seconds": seconds}
    return row


def summary(rows: list[dict]) -> dict:
    out = {}
    for c in COLUMNS:
        xs = [r[c] for r in rows]
        out[c] = {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}
        if c in PAPER:
            lo, hi = PAPER[c]
            out[c]["in_paper_range"] = sum(lo <= x <= hi for x in xs)
    return out


def markdown(s: dict, n: int, title: str) -> str:
    lines = [f"{title} ({n} test explants)", "", "| quantity | min | median | max | in paper range | paper |",
             "|---|---:|---:|---:|---:|---|"]
    for c in COLUMNS:
        v = s[c]
        fmt = ".1f" if c in ("bic_percent", "bv_tv_percent") else ".3f"
        inr = f"{v['in_paper_range']}/{n}" if c in PAPER else ""
        paper = "–".join(f"{x:g}" for x in PAPER[c]) if c in PAPER else ""
        lines.append(f"| {c} | {v['min']:{fmt}} | {v['median']:{fmt}} | {v['max']:{fmt}} | {inr} | {paper} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--degradation-scale", type=float, default=2.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=7, help="test explants per seed")
    ap.add_argument("--n-train", type=int, default=14, help="training samples before the test samples in the plan")
    ap.add_argument("--voxel-size-um", type=float, default=5.0)
    ap.add_argument("--roi-um", type=float, default=100.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    print(f"data.synth v{GENERATOR_VERSION}, {args.size}³, degradation scale {args.degradation_scale:g}")
    print("seed idx alloy   beam days  DR[mm/y] (bound)  BIC[%] BV/TV[%]  bg    bone  dl    rm    DLthick  s")
    for seed in args.seeds:
        for p in sample_plan(args.n_train, args.k)[args.n_train:]:
            r = measure_sample(args.size, seed, p, voxel_size_um=args.voxel_size_um,
                               degradation_scale=args.degradation_scale, roi_um=args.roi_um)
            rows.append(r)
            print(f"{seed:4d} {p['index']:3d} {p['alloy']:7s} {p['beamline']:4s} {p['days']:4.0f} "
                  f"{r['dr_mm_per_year']:8.3f} ({r['dr_bound_mm_per_year']:.3f}) "
                  f"{r['bic_percent']:7.1f} {r['bv_tv_percent']:7.1f}  "
                  f"{r['frac_bg']:.3f} {r['frac_bone']:.3f} {r['frac_dl']:.3f} {r['frac_rm']:.3f} "
                  f"{r['dl_thick_vox']:6.2f} {r['seconds']:5.2f}", flush=True)
    s = summary(rows)
    print()
    print(markdown(s, len(rows), f"data.synth v{GENERATOR_VERSION}, {args.size}³, degradation scale "
                                 f"{args.degradation_scale:g}, seeds {' '.join(map(str, args.seeds))}"))
    if args.json:
        doc = {"command": "python benchmarks/synth_measures.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "generator_version": GENERATOR_VERSION, "size": args.size,
               "degradation_scale": args.degradation_scale, "seeds": args.seeds, "k": args.k,
               "roi_um": args.roi_um, "paper_hq_ranges": PAPER, "rows": rows, "summary": s}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
