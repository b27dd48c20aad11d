"""Command line of the implant measures: ``python -m analysis.measures`` (a table or JSON of one label volume)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing as tp
from pathlib import Path

from analysis import measures
from analysis.measures import check_positive, implant_measures
from data.errors import DataError
from data.volume import open_volume, volume_ref

_OPTION = {"voxel_size_um": "--voxel-size-um", "roi_um": "--roi-um", "initial_volume_mm3": "--initial-volume-mm3",
           "initial_surface_mm2": "--initial-surface-mm2", "days": "--days", "slab": "--slab"}
_ROWS = (("dr_mm_per_year", "DR (Eq. 1)", "mm/year", ".4f"),
         ("bic_percent", "BIC (Eq. 2)", "%", ".2f"),
         ("bv_tv_percent", "BV/TV (Eq. 3)", "%", ".2f"),
         ("residual_volume_mm3", "residual material volume", "mm³", ".6g"),
         ("degradation_layer_volume_mm3", "degradation layer volume", "mm³", ".6g"),
         ("implant_volume_mm3", "implant volume (DL ∪ RM)", "mm³", ".6g"),
         ("implant_surface_mm2", "implant surface", "mm²", ".6g"),
         ("contact_surface_mm2", "bone contact surface", "mm²", ".6g"),
         ("bone_volume_mm3", "bone volume in ROI", "mm³", ".6g"),
         ("roi_volume_mm3", "ROI volume", "mm³", ".6g"),
         ("voxel_size_um", "voxel size", "µm", "g"),
         ("roi_um", "ROI distance R", "µm", "g"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> tp.NoReturn:  # one line, no usage dump: the message names the option
        self.exit(2, f"error: {message} (see python -m analysis.measures --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m analysis.measures", description=measures.__doc__.split("\n\n")[0])
    ap.add_argument("labels", help="label volume: HDF5 file (see --dataset) or folder of TIFF slices")
    ap.add_argument("--dataset", default="labels",
                    help="HDF5 dataset key (default: %(default)s, as model.predict writes)")
    ap.add_argument("--voxel-size-um", type=float, required=True, help="isotropic voxel size in µm")
    ap.add_argument("--roi-um", type=float, default=100.0,
                    help="BV/TV: ROI = non-implant voxels within this distance (µm) of the implant "
                         "(default: %(default)s)")
    ap.add_argument("--initial-volume-mm3", type=float, help="DR: initial screw volume v_i")
    ap.add_argument("--initial-surface-mm2", type=float, help="DR: initial screw surface a_i")
    ap.add_argument("--days", type=float, help="DR: implantation time in days")
    ap.add_argument("--slab", type=int, default=64, help="slices per slab; memory grows with it (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (NaN as null)")
    return ap


def _json_value(v: float) -> tp.Optional[float]:
    return None if isinstance(v, float) and math.isnan(v) else v


def _table(res: tp.Mapping[str, float], source: str) -> str:
    lines = [f"implant measures of {source}"]
    for key, name, unit, fmt in _ROWS:
        v = res[key]
        lines.append(f"  {name:<28} {'n/a' if math.isnan(v) else format(v, fmt):>12} {unit}")
    if math.isnan(res["dr_mm_per_year"]):
        lines.append("  (DR needs --initial-volume-mm3, --initial-surface-mm2 and --days)")
    return "\n".join(lines)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    path = Path(args.labels)
    ref = volume_ref(path, args.dataset)
    try:
        for field in ("voxel_size_um", "roi_um", "initial_volume_mm3", "initial_surface_mm2", "days"):
            value = getattr(args, field)
            if value is not None:
                check_positive(field, value)
        with open_volume(ref) as vol:
            res = implant_measures(vol, voxel_size_um=args.voxel_size_um, roi_um=args.roi_um,
                                   initial_volume_mm3=args.initial_volume_mm3,
                                   initial_surface_mm2=args.initial_surface_mm2, days=args.days, slab=args.slab)
    except DataError as exc:
        # an option's problem names the option as typed; a data problem names the file (and dataset)
        where = _OPTION.get(exc.field or "") if exc.path is None else None
        text = f"{where}: {exc.problem}" if where else (str(exc) if exc.path else f"{ref}: {exc}")
        print(f"error: {text}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: _json_value(v) for k, v in res.items()} | {"labels": str(ref)}))
    else:
        print(_table(res, str(ref)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
