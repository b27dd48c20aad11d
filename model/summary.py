"""Parameters, FLOPs and receptive field of the paper's U-net configurations (analytic, instant).

    python -m model.summary --width 32 --depth 3 --input-size 384 [--json]
    python -m model.summary --all [--json]

``--all`` covers the paper's 48 configurations (c0 in {32, 64, 96, 112}, d in {3, 4, 5, 6},
IS in {384, 512, 640}; Baltruschat et al. 2021, Model section and Fig. 3): a table by default,
one JSON object per line with ``--json``. Bad input (e.g. an input size that is not a multiple
of 2^depth, width < 1) prints one error line naming the field and exits with code 2.
No Keras/TensorFlow import: the numbers come from :mod:`model.complexity`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing as tp

from model.complexity import (
    count_flops,
    count_params,
    level_channels,
    paper_receptive_field,
    receptive_field,
)
from model.validation import check_depth, check_input_size, check_num_classes, check_width

PAPER_WIDTHS = (32, 64, 96, 112)
PAPER_DEPTHS = (3, 4, 5, 6)
PAPER_INPUT_SIZES = (384, 512, 640)
PROG = "python -m model.summary"


class UsageError(Exception):
    """Bad command-line input; the message names the field."""


def summarize(width: int, depth: int, input_size: int, num_classes: int = 4) -> tp.Dict[str, tp.Any]:
    """One configuration as a JSON-ready dict. Raises ``ValueError`` naming the bad field."""
    width, depth = check_width(width), check_depth(depth)
    num_classes = check_num_classes(num_classes)
    check_input_size(input_size, depth)
    flops = count_flops(width, depth, input_size, num_classes)
    params = count_params(width, depth, num_classes)
    rf = receptive_field(depth)
    return {
        "width": width,
        "depth": depth,
        "input_size": input_size,
        "num_classes": num_classes,
        "params": params,
        "params_millions": round(params / 1e6, 3),
        "flops": flops,  # forward pass, one image, 2 x MACs of all (transposed) convs
        "gflops": round(flops / 1e9, 3),
        "receptive_field": rf,  # true, per axis, pixels
        "paper_receptive_field": paper_receptive_field(depth),  # as stated in the paper
        "receptive_field_covers_input": rf >= input_size,
        "input_size_ok": True,  # multiple of 2^depth (otherwise summarize raises)
        "bottleneck_size": input_size // 2**depth,
        "channels": level_channels(width, depth),
    }


def paper_grid(num_classes: int = 4) -> tp.List[tp.Dict[str, tp.Any]]:
    """The 48 configurations of the paper, ordered by input size, depth, width."""
    return [
        summarize(w, d, s, num_classes)
        for s in PAPER_INPUT_SIZES
        for d in PAPER_DEPTHS
        for w in PAPER_WIDTHS
    ]


def format_table(rows: tp.Sequence[tp.Dict[str, tp.Any]]) -> str:
    header = f"{'c0':>4} {'d':>2} {'IS':>5} {'params':>15} {'GFLOPs':>10} {'RF':>5} {'RF(paper)':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['width']:>4} {r['depth']:>2} {r['input_size']:>5} {r['params']:>15,} "
            f"{r['gflops']:>10.1f} {r['receptive_field']:>5} {r['paper_receptive_field']:>9}"
        )
    lines.append(
        "params: exact Keras count_params(); GFLOPs: forward pass, one image, 2 x MACs of all "
        "convolutions incl. transposed; RF: true receptive field in pixels (the paper's values "
        "ignore the upsampling stride, see model.complexity.paper_receptive_field)."
    )
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> tp.NoReturn:  # one line, exit 2 (argparse's convention)
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, help="c0, channels of the first conv layer (paper: 32/64/96/112)")
    ap.add_argument("--depth", type=int, help="d, number of encoder conv blocks (paper: 3/4/5/6)")
    ap.add_argument("--input-size", type=int, help="IS, square input side in pixels (paper: 384/512/640)")
    ap.add_argument("--num-classes", type=int, default=4, help="output classes (default 4)")
    ap.add_argument("--all", action="store_true", help="all 48 paper configurations")
    ap.add_argument("--json", action="store_true", help="JSON (one object per line) instead of text")
    return ap


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.all:
            given = [n for n in ("width", "depth", "input_size") if getattr(args, n) is not None]
            if given:
                raise UsageError(f"--{given[0].replace('_', '-')}: not allowed together with --all")
            rows = paper_grid(args.num_classes)
        else:
            missing = [n for n in ("width", "depth", "input_size") if getattr(args, n) is None]
            if missing:
                raise UsageError(f"--{missing[0].replace('_', '-')}: required (or use --all)")
            rows = [summarize(args.width, args.depth, args.input_size, args.num_classes)]
    except (UsageError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.all:
        print(format_table(rows))
    else:
        r = rows[0]
        print(format_table(rows).rsplit("\n", 1)[0])
        print(
            f"input {r['input_size']}x{r['input_size']} -> bottleneck "
            f"{r['bottleneck_size']}x{r['bottleneck_size']}, channels {r['channels']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
