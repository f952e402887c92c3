# All targets use the project's virtual environment in .venv (made by `make install`).
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/dipnet-deploy
SHARED ?= ../shared

.PHONY: install test demo bench lint calibration clean mutants

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
	test -f build/dipnet_x2_1080x1920.int8.onnx || $(CLI) quantize
	cd benchmarks && ../$(PY) bench_upscale.py --model ../build/dipnet_x2_1080x1920.onnx
	cd benchmarks && ../$(PY) bench_graph_form.py --int8 ../build/dipnet_x2_1080x1920.int8.onnx
	$(PY) -m pip install --quiet -e ".[bench]"
	test -f runs/ft_x2.pth || $(CLI) finetune --data $(SHARED)/data/train --out runs/ft_x2.pth --json
	cd benchmarks && ../$(PY) bench_finetune.py --variant x2 --finetuned ../runs/ft_x2.pth
	cd benchmarks && ../$(PY) bench_int8_floor.py --finetuned ../runs/ft_x2.pth
	test -f runs/ft_x4.pth || $(CLI) finetune --checkpoint $(SHARED)/weights/dipnet_official_x4.pth \
		--data $(SHARED)/data/train --iters 10000 --batch 16 --out runs/ft_x4.pth --json
	cd benchmarks && ../$(PY) bench_finetune.py --variant x4 --finetuned ../runs/ft_x4.pth

# Mutation testing of the numeric core ([tool.mutmut] in pyproject.toml), in a copy of the tree under
# build/mutation so the work tree is never touched. Not part of CI (tens of minutes on 2 cores).
MUTATION := build/mutation
mutants: install
	$(PY) -m pip install --quiet "mutmut==3.8.1"
	rm -rf $(MUTATION) && mkdir -p $(MUTATION)
	tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./report --exclude=./runs \
		--exclude=./training --exclude=./scratch --exclude='*.egg-info' -cf - . | tar -xf - -C $(MUTATION)
	cd $(MUTATION) && DIPNET_SHARED=$(abspath $(SHARED)) $(abspath $(VENV))/bin/mutmut run --max-children 2 || true
	cd $(MUTATION) && $(abspath $(VENV))/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json
	cd $(MUTATION) && $(abspath $(VENV))/bin/mutmut results

clean:
	rm -rf build report .pytest_cache
