# Two entry points (README): `make demo` runs the main job on the embedded default, `make test` the tests.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# GPU=1 (or `make venv-gpu`): the gpu extra, NVIDIA's CUDA wheels for tensorflow (GPU nodes; docs/cluster.md).
GPU    ?=
COMMA  := ,
IS_GPU := $(filter 1 yes true,$(GPU))
EXTRAS := test$(if $(IS_GPU),$(COMMA)gpu)
# make test: two pytest-xdist workers (the suite alone keeps 1.1 of 2 cores busy); the SLURM tests are one group
# (tests/conftest.py). XDIST= runs one process.
XDIST  ?= -n 2 --dist loadgroup --no-loadscope-reorder
STAMP  := $(VENV)/.installed-stamp$(if $(IS_GPU),-gpu)
# The installer: uv, pinned, into the venv itself (the first step needs only pip).
UV_PIN := uv==0.13.10
UV     := $(VENV)/bin/uv
UVPIP  := UV_LINK_MODE=copy $(UV) pip install -q --python $(PY)
DEMO   ?= demo
WORK   := $(abspath $(DEMO))/work
# Table 2/3 of the demo: one config (c0=112 → 7 channels, d=3, IS=384² → 64²) trained 3000 iterations at
# batch 8 in its own MLflow experiment (Fig. 3 keeps one run set per grid point); the fusing sweep then
# takes the best config of that experiment (fusing.model=best), i.e. this one.
TABLE2 := mlflow.experiment=scaling-unet-table2 model.width=112 model.depth=3 model.input_size=384 \
          train.max_iters=3000 train.checkpoint_every=250 train.lr_patience_iters=500 \
          train.early_stop_patience_iters=2000 train.batch_size=8
SAMPLE := $(WORK)/data/synthetic-64-seed0-dl2.5-n14-3/prepared
# Table 3's conformal intervals (docs/measures.md): a small calibration set of held-out synthetic explants with exact
# labels (10 scans: the fewest for a finite 90 % interval is 9; benchmarks/calibration.py measures 5, 10 and 30).
CALIB  := $(WORK)/data/calibration-64-seed1000-dl2.5-n10
# One demo phase, timed into $(WORK)/phases.jsonl; `python docs/demo_story.py keep` + `readme` put one run in README.
PHASE  := SCALING_UNET_WORK=$(WORK) $(PY) docs/demo_story.py time --log $(WORK)/phases.jsonl --phase

.PHONY: demo test venv venv-gpu bench clean

venv: $(STAMP)

venv-gpu:
	$(MAKE) venv GPU=1

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "scaling-unet needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv installs the same pins as pip, 35 s instead of 88 s on a fresh venv here (docs/benchmarks.md); pip stays
	# in the venv for installs by hand (docs/cluster.md).
	test -x $(UV) || $(PY) -m pip install -q $(UV_PIN)
	# A venv made when the pin was tensorflow-cpu: tensorflow-cpu and tensorflow write the same module files, so
	# both go before tensorflow is installed (uninstalling tensorflow-cpu after would delete tensorflow's files).
	if $(PY) -m pip show -q tensorflow-cpu 2>/dev/null; then $(UV) pip uninstall -q --python $(PY) tensorflow-cpu tensorflow; fi
	# hydra-optuna-sweeper 1.3.0 declares optuna<3 but works with optuna 5 (platform-facts): no deps.
	$(UVPIP) --no-deps hydra-optuna-sweeper==1.3.0
	# compat mode puts the checkout on sys.path, so Hydra finds hydra_plugins/ (our launchers). Bytecode compiled
	# now: with PYTHONDONTWRITEBYTECODE set, an uncompiled venv imports TensorFlow in 14 s instead of 6.6 s.
	$(UVPIP) --compile-bytecode -e '.[$(EXTRAS)]' --config-setting editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	# The main job on the embedded default: the full 192-run compound grid at laptop scale on synthetic
	# data, local launcher, local MLflow store; then Table 2's seven fusing methods on the test samples
	# (one config trained longer, 4 folds) and its 4-fold ensemble; then Fig. 3, Table 2, Table 3, Fig. 4/5
	# in $(DEMO)/reports. Each phase's wall time goes to $(WORK)/phases.jsonl (docs/demo_story.py).
	# Run again: finished runs are skipped.
	$(PHASE) grid -- $(PY) -m sweep +experiment=compound -m
	$(PHASE) table2 -- $(PY) -m sweep $(TABLE2) 'fold=range(4)' -m
	# Beside the per-fold fusing sweep, one job (no -m): the 4 fold models as one ensemble (softmax averaged) →
	# Table 2's "4-fold ensemble" rows, and Table 3's ML row from its labels. Its log follows the sweep's.
	$(PHASE) fusing -- sh -c '$(PY) -m sweep +experiment=fusing fusing.ensemble=true $(TABLE2) > $(WORK)/ensemble.log 2>&1 & \
	    e=$$!; $(PY) -m sweep +experiment=fusing $(TABLE2) -m; f=$$?; wait $$e; e=$$?; cat $(WORK)/ensemble.log; \
	    test $$f -eq 0 && test $$e -eq 0'
	# The fold ensemble registered (models:/scaling-unet-table2@best), calibrated on 10 synthetic HQ scans; the table
	# is logged with the version (analysis.segment --calibration auto finds it) and Table 3 shows its intervals.
	$(PHASE) calibration -- sh -c '$(PY) -m sweep.register $(TABLE2) && \
	    { test -f $(CALIB)/prepared/manifest.yaml || { $(PY) -m data.synth --out $(CALIB)/raw --n-train 0 --n-test 10 \
	    --size 64 --seed 1000 --degradation-scale 2.5 --overwrite && \
	    $(PY) -m data.prepare $(CALIB)/raw --out $(CALIB)/prepared --overwrite; }; } && \
	    { test -f $(WORK)/calibration.json || $(PY) -m analysis calibrate --model models:/scaling-unet-table2@best \
	    --tracking-uri sqlite:///$(WORK)/mlflow.db --scans $(CALIB)/prepared --no-members --out $(WORK)/calibration.json; }'
	$(PHASE) reports -- sh -c '$(PY) -m data.show $(SAMPLE) --sample synth01 --out $(DEMO)/synthetic_sample.png && \
	    $(PY) -m analysis reports --tracking-uri sqlite:///$(WORK)/mlflow.db --experiment scaling-unet \
	    --fusing-experiment scaling-unet-table2-fusing --out $(DEMO)/reports --calibration $(WORK)/calibration.json && \
	    cp $(WORK)/fusing/*/fold0/fig4.png $(WORK)/fusing/*/fold0/fig5.png $(DEMO)/reports/'
	@echo "demo: MLflow store $(WORK)/mlflow.db (view: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(WORK)/mlflow.db,"
	@echo "      then the links the sweeps printed, or switch the UI to Model training, top left: it starts on GenAI),"
	@echo "      Fig. 3, Table 2, Table 3, Fig. 4/5 in $(DEMO)/reports/, a synthetic sample in $(DEMO)/synthetic_sample.png"

test: $(STAMP)
	# The tests use a real single-node SLURM cluster (slurm/) and real MLflow servers they start themselves.
	bash slurm/install.sh
	bash slurm/start.sh > /dev/null
	# SLURM tests fail (never skip) when the cluster cannot run: it was started just above.
	SCALING_UNET_REQUIRE_SLURM=1 $(PY) -m pytest -q -p no:cacheprovider --durations=30 -rs $(XDIST)

bench: $(STAMP)
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/fusion.py --sizes 256 512 --baseline-sizes 256
	$(PY) benchmarks/reports.py

clean:
	rm -rf $(DEMO) .pytest_cache
