"""Argument checks shared by the model builder, the analytic counts and the CLI.

Pure Python (no Keras, no TensorFlow) so that ``model.complexity`` and ``model.summary`` stay
instant. Every error is a ``ValueError`` whose message starts with the name of the field.
"""

from __future__ import annotations

import numbers
import typing as tp

IntOrPair = tp.Union[int, tp.Sequence[int]]
#: Inference dtype policies (model.unet.inference_precision): auto, or a Keras mixed-precision policy.
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value: object, field: str, minimum: int = 1) -> int:
    """Return ``int(value)`` or raise ``ValueError("<field> must be an integer >= minimum ...")``."""
    if not _is_int(value):
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_width(width: object) -> int:
    """c0, the number of output channels of the first conv layer (paper: 32, 64, 96, 112)."""
    return check_positive_int(width, "width")


def check_depth(depth: object) -> int:
    """d, the number of encoder conv blocks / 2x2 max-pools (paper: 3, 4, 5, 6)."""
    return check_positive_int(depth, "depth")


def check_num_classes(num_classes: object) -> int:
    return check_positive_int(num_classes, "num_classes")


def as_hw(input_size: IntOrPair, field: str = "input_size") -> tp.Tuple[int, int]:
    """``384`` -> ``(384, 384)``; ``(h, w)`` -> ``(h, w)``; anything else -> ValueError."""
    if _is_int(input_size):
        pair = (input_size, input_size)
    else:
        try:
            pair = tuple(input_size)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"{field} must be an integer or an (height, width) pair, got {input_size!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{field} must be an integer or an (height, width) pair, got {input_size!r}")
    for v in pair:
        if not _is_int(v) or v < 1:
            raise ValueError(f"{field} must be a positive integer, got {input_size!r}")
    return int(pair[0]), int(pair[1])


def check_input_size(input_size: IntOrPair, depth: int) -> tp.Tuple[int, int]:
    """Check that a (training or inference) input size can pass through a depth-``d`` U-net.

    The encoder halves the feature map ``depth`` times with 2x2 max-pools and the decoder doubles
    it back with stride-2 transposed convolutions, so the skip concatenations only line up when
    height and width are multiples of ``2**depth``. The paper's sizes 384, 512 and 640 are
    multiples of 2^7, hence valid for every d in {3, 4, 5, 6}.

    Returns ``(height, width)``; raises ``ValueError("input_size N is not divisible by
    2^depth=M ...")`` otherwise.
    """
    depth = check_depth(depth)
    h, w = as_hw(input_size)
    m = 2**depth
    for v in (h, w):
        if v % m:
            lower, upper = (v // m) * m, (v // m + 1) * m
            hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            shown = input_size if _is_int(input_size) else f"{v} (of {tuple(input_size)})"  # type: ignore[arg-type]
            raise ValueError(
                f"input_size {shown} is not divisible by 2^depth={m} "
                f"(the U-net max-pools {depth} times by 2); use a multiple of {m}, e.g. {hint}, "
                f"or pad (model.unet.pad_to_multiple)"
            )
    return h, w
