"""The paper's U-net (Baltruschat et al. 2021, "Scaling the U-net", Model section).

* :mod:`model.unet` -- ``build_unet`` (pure Keras 3), padding/cropping and full-slice inference;
* :mod:`model.complexity` -- exact analytic parameter / FLOP / receptive-field counts (no Keras);
* :mod:`model.summary` -- ``python -m model.summary`` CLI over the 48 (c0, d, IS) configurations.

Importing ``model`` does not import Keras: the Keras-dependent names below are loaded on first
use, so ``python -m model.summary`` and ``model.complexity`` stay instant.
"""

from __future__ import annotations

import importlib
import typing as tp

from model.quiet import quiet_tensorflow_logs

quiet_tensorflow_logs()  # before any submodule imports TensorFlow

from model.complexity import count_flops, count_params, paper_receptive_field, receptive_field
from model.validation import check_input_size

_LAZY = {
    "build_unet": "model.unet",
    "pad_to_multiple": "model.unet",
    "crop_padding": "model.unet",
    "predict_full_slice": "model.unet",
    "infer_depth": "model.unet",
}

__all__ = [
    "build_unet",
    "check_input_size",
    "count_flops",
    "count_params",
    "crop_padding",
    "infer_depth",
    "pad_to_multiple",
    "paper_receptive_field",
    "predict_full_slice",
    "receptive_field",
]


def __getattr__(name: str) -> tp.Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
