"""TensorFlow's C++ log level before TensorFlow is imported: quiet where no GPU exists, as loud as ever where one does.

On a machine without NVIDIA devices every TensorFlow import logs ``E0000 … failed call to cuInit: UNKNOWN ERROR
(303)``: an error line though nothing is wrong (a CPU run asked for no GPU). There TF_CPP_MIN_LOG_LEVEL=3 hides it;
on a GPU node (``/dev/nvidiactl`` exists) level 2 keeps CUDA's errors, so a job that cannot use its GPUs still shows
why, besides model.devices' own refusal. A level the user set is kept.
"""

from __future__ import annotations

import os
from pathlib import Path


def nvidia_devices_present(dev: Path = Path("/dev")) -> bool:
    """Whether the NVIDIA driver's device nodes exist (a GPU node, or a container given its GPUs)."""
    return (dev / "nvidiactl").exists() or any(dev.glob("nvidia[0-9]*"))


AUTO = "SCALING_UNET_TF_LOG_LEVEL_AUTO"  # the level below was chosen here, not by the user


def quiet_tensorflow_logs() -> str:
    """Set TF_CPP_MIN_LOG_LEVEL: 3 (errors hidden) without NVIDIA devices, else 2; returns the level.

    A level the user set is kept; one this function chose on another machine (a login node without GPUs whose
    environment a SLURM job inherits) is chosen again for this one."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(AUTO) != "1":
        return os.environ["TF_CPP_MIN_LOG_LEVEL"]
    level = "2" if nvidia_devices_present() else "3"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = level
    os.environ[AUTO] = "1"
    return level
