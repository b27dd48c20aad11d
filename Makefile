# Two entry points (README): `make demo` runs the main job on the embedded default, `make test` the tests.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
SIZE   ?= 96

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "scaling-unet needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# compat mode puts the checkout on sys.path, so Hydra finds hydra_plugins/ (our launchers).
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# hydra-optuna-sweeper 1.3.0 declares optuna<3 but works with optuna 5 (platform-facts): no deps.
	$(PY) -m pip install -q --no-deps hydra-optuna-sweeper==1.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m data.synth --out $(DEMO)/raw --size $(SIZE) --overwrite
	$(PY) -m data.prepare $(DEMO)/raw --out $(DEMO)/prepared --overwrite
	$(PY) -m data.show $(DEMO)/prepared --sample synth01 --out $(DEMO)/synthetic_sample.png
	SCALING_UNET_WORK=$(abspath $(DEMO))/work $(PY) -m sweep
	@echo "demo: prepared dataset in $(DEMO)/prepared, picture in $(DEMO)/synthetic_sample.png,"
	@echo "      one laptop-scale training run in $(DEMO)/work (MLflow: sqlite:///$(abspath $(DEMO))/work/mlflow.db)"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(DEMO) .pytest_cache
