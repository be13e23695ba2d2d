# One virtual environment, pinned to what CI uses (constraints-ci.txt); setup.cfg keeps ranges for users.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup sample test bench gpu-check space demo clean

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

# The Gradio Space: `make space` writes a deployable Space folder into space/ (the digits model; pass a Hub model
# with `python space_app/build_space.py --output space --model ID`); `make demo` serves the app on 127.0.0.1:7860.
space: setup
	$(PY) space_app/build_space.py --output space

demo: setup
	$(PY) space_app/app.py

bench: setup
	$(PY) benchmarks/bench_transformer.py

# On a CUDA machine (CI has none): the tests marked `gpu`, then the benchmark in bf16 and fp16.
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu tests
	$(PY) benchmarks/bench_transformer.py

clean:
	rm -rf $(VENV) build dist *.egg-info space
