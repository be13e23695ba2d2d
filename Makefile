# One virtual environment, pinned to what CI uses (constraints-ci.txt); setup.cfg keeps ranges for users.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup sample test bench bench-cpu gpu-check gpu-suite-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints-ci.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints-ci.txt torch==2.13.0
	$(PIP) install -c constraints-ci.txt -e ".[test]"
	touch $@

# The main job: sample a grid of digits from the model shipped inside the package (no download).
sample: setup
	$(VENV)/bin/diffit sample --labels 3 1 4 --num-images-per-label 8 --output grid.png

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_transformer.py

# The CPU comparison of the README: fp32, 2 threads, batch 2, against the NVIDIA-like reference, paired rounds.
bench-cpu: setup
	$(PY) benchmarks/bench_transformer.py --device cpu --threads 2 --only ours --repeats 9

# On a CUDA machine (CI has none): the tests marked `gpu`, then the GPU suite (one table, <= 8 min on an H100/H200).
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu tests
	$(PY) benchmarks/gpu_suite.py

# The suite's every code path on a tiny config, on the CPU (what `gpu-check` runs, minus the GPU).
gpu-suite-smoke: setup
	$(PY) benchmarks/gpu_suite.py --tiny --device cpu --resolutions 256 512 --dtypes bf16 --batches 1 2 --repeats 1 --window 1 --warmup 1

clean:
	rm -rf $(VENV) build dist *.egg-info
