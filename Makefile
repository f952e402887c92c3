# All targets use the project's virtual environment in .venv (made by `make install`).
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/dipnet-deploy
SHARED ?= ../shared

.PHONY: install test demo bench lint calibration clean

install: $(VENV)/.installed

# torch first, pinned: this exact version is the CPU wheel on these machines, and any later
# resolution of "torch>=2.4" is then already satisfied (no multi-GB CUDA build is pulled).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check dipnet_deploy tests benchmarks

calibration: install
	$(PY) -m dipnet_deploy.calibration_set calibration

# export (packaged x2 weights, 1080p) -> quantize (calibration/) -> compare (Set5 from ../shared)
demo: install
	$(CLI) export
	$(CLI) quantize
	$(CLI) compare report --data $(SHARED)/data/eval/Set5

bench: install
	$(CLI) export
	cd benchmarks && ../$(PY) bench_export.py
	cd benchmarks && ../$(PY) bench_quantize.py --model ../build/dipnet_x2_1080x1920.onnx
	cd benchmarks && ../$(PY) bench_quality_floor.py
	cd benchmarks && ../$(PY) bench_equalize.py --model ../build/dipnet_x2_1080x1920.onnx
	cd benchmarks && ../$(PY) bench_train.py

clean:
	rm -rf build report .pytest_cache
