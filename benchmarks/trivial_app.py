"""A Hydra app that does nothing: the baseline job for benchmarks/sweep_queue.py (plain hydra-submitit-launcher)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> int:
    return 0


if __name__ == "__main__":
    main()
