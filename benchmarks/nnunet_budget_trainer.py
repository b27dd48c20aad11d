"""nnU-Net v2 trainer that stops on a wall-time budget (or after N epochs) and records what it did.

Not imported by the project: ``benchmarks/nnunet_compare.py`` copies this file into the installed nnunetv2 package,
``nnunetv2/training/nnUNetTrainer/nnunet_budget_trainer.py``, because ``nnUNetv2_train -tr`` and the predictor find
trainer classes by name only there (``nnunetv2.utilities.find_objects.recursive_find_trainer_class_by_name``; the
top-level modules of that folder are searched before its subpackages, some of which import timm → torchvision,
which cannot be imported beside the CPU build of torch here). The ``nnUNet_extTrainer`` folder of nnunetv2 2.8 is
searched only after those subpackages, so it is no way round that.

``nnUNetv2_train`` has no options for a trainer, so the budget comes from the environment:

* ``NNC_BUDGET_S``: seconds of training per fold, counted from the first training iteration (after nnU-Net's own
  set-up: data loader workers, unpacking), including nnU-Net's per-epoch validation iterations and checkpoints;
  the clock is read after every iteration, so the run ends at most one iteration (or validation batch) late.
  nnU-Net's poly learning-rate schedule, ``lr = 0.01 (1 - t)^0.9``, runs over the budget's fraction t instead of
  the epochs (its default of 1000 epochs would keep the rate near 0.01 in a short run).
* ``NNC_EPOCHS``: nnU-Net's own schedule over that many epochs of 250 iterations (no time limit).

At the end it saves ``checkpoint_final.pth`` as nnU-Net always does, then ``budget_stats.json`` beside it.
``NNC_ITERATIONS_PER_EPOCH`` (smoke tests only) shortens nnU-Net's epochs of 250 training and 50 validation
iterations to N and max(1, N // 5). ``NNC_FINAL_VALIDATION=0`` skips nnU-Net's validation of the fold's validation cases after training (sliding-window
prediction of whole volumes: minutes per fold on 2 cores; the comparison scores the test scans instead).
"""

from __future__ import annotations

import json
import os
import time
import typing as tp

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGET_ENV = "NNC_BUDGET_S"
EPOCHS_ENV = "NNC_EPOCHS"
ITERATIONS_ENV = "NNC_ITERATIONS_PER_EPOCH"
FINAL_VALIDATION_ENV = "NNC_FINAL_VALIDATION"
STATS_FILE = "budget_stats.json"
POLY_EXPONENT = 0.9  # nnU-Net's PolyLRScheduler


class nnUNetTrainerBudget(nnUNetTrainer):
    """nnUNetTrainer with a wall-time budget (``NNC_BUDGET_S``) or an epoch count (``NNC_EPOCHS``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Same signature as the base class: nnU-Net stores the init arguments in every checkpoint.
        super().__init__(plans, configuration, fold, dataset_json, device)
        budget = os.environ.get(BUDGET_ENV, "").strip()
        epochs = os.environ.get(EPOCHS_ENV, "").strip()
        if bool(budget) == bool(epochs):
            raise RuntimeError(f"set exactly one of {BUDGET_ENV} (seconds) and {EPOCHS_ENV} for {type(self).__name__}")
        self.budget_s: tp.Optional[float] = float(budget) if budget else None
        if epochs:
            self.num_epochs = int(epochs)
        iterations = os.environ.get(ITERATIONS_ENV, "").strip()
        if iterations:
            self.num_iterations_per_epoch = int(iterations)
            self.num_val_iterations_per_epoch = max(1, int(iterations) // 5)  # nnU-Net's ratio, 250 : 50
        self.iterations_done = 0
        self.setup_s = 0.0
        self.train_s = 0.0
        self.stopped_by = "epochs"
        self._t0: tp.Optional[float] = None

    def _elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def _spent(self) -> bool:
        return self.budget_s is not None and self._elapsed() >= self.budget_s

    def _budget_lr(self) -> None:
        """Poly schedule over the budget's elapsed fraction (set before every iteration)."""
        frac = min(self._elapsed() / tp.cast(float, self.budget_s), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * (1.0 - frac) ** POLY_EXPONENT

    def run_training(self) -> None:
        """nnUNetTrainer.run_training with a clock: stop when the budget is spent, even within an epoch."""
        t_setup = time.perf_counter()
        self.on_train_start()
        self._t0 = time.perf_counter()
        self.setup_s = self._t0 - t_setup
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                if self.budget_s is not None:
                    self._budget_lr()
                outputs.append(self.train_step(next(self.dataloader_train)))
                self.iterations_done += 1
                if self._spent():
                    break
            if len(outputs) < self.num_iterations_per_epoch:
                # A partial epoch is not logged as one: nnU-Net's logger wants whole epochs.
                self.stopped_by = "budget"
                break
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for _ in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                    if self._spent():
                        break
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            if self._spent():
                self.stopped_by = "budget"
                break
        self.train_s = self._elapsed()
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation of the fold's validation cases, unless ``NNC_FINAL_VALIDATION=0``."""
        if os.environ.get(FINAL_VALIDATION_ENV, "1").strip() == "0":
            self.print_to_log_file(f"final validation skipped ({FINAL_VALIDATION_ENV}=0)")
            return
        super().perform_actual_validation(save_probabilities)

    def on_train_end(self) -> None:
        """nnU-Net's own end (``checkpoint_final.pth``), then the stats file (atomically)."""
        super().on_train_end()
        if self.local_rank != 0:
            return
        stats = {
            "trainer": type(self).__name__,
            "mode": "budget" if self.budget_s is not None else "epochs",
            "budget_s": self.budget_s,
            "epochs_requested": None if self.budget_s is not None else self.num_epochs,
            "epochs_completed": int(self.current_epoch),
            "stopped_by": self.stopped_by,
            "iterations": self.iterations_done,
            "batch_size": int(self.batch_size),
            "images_seen": self.iterations_done * int(self.batch_size),
            "train_seconds": round(self.train_s, 3),
            "setup_seconds": round(self.setup_s, 3),
            "seconds_per_iteration": round(self.train_s / max(self.iterations_done, 1), 4),
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "final_lr": float(self.optimizer.param_groups[0]["lr"]),
            "patch_size": [int(v) for v in self.configuration_manager.patch_size],
            "torch_threads": torch.get_num_threads(),
            "device": str(self.device),
        }
        path = os.path.join(self.output_folder, STATS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=1)
        os.replace(tmp, path)  # a fold counts as done only with its stats complete
