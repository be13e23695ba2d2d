# One virtual environment, pinned to what CI uses (constraints-ci.txt); setup.cfg keeps ranges for users.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup sample lint docs format browser test test-other-kernels bench bench-cpu bench-compile bench-precision bench-quant gpu-check gpu-suite-smoke dist space demo digits-latent clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints-ci.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints-ci.txt torch==2.13.0
	$(PIP) install -c constraints-ci.txt -e ".[test]"
	touch $@

# The main job: sample a grid of digits from the model shipped inside the package (no download).
sample: setup
	$(VENV)/bin/diffit sample --labels 3 1 4 --num-images-per-label 8 --output grid.png

# Debian's Chromium for the Space's browser tests, installed when missing (Playwright drives it; its own browser
# download is not used). They fail without it, unless DIFFIT_SKIP_UI=1.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# ruff with diffusers' settings (pyproject.toml): pyflakes, pycodestyle errors and warnings, import order, and the
# formatting `make format` applies.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The docs site (mkdocs-material, API pages from the docstrings by mkdocstrings) into site/; --strict makes a broken
# link or reference an error. Offline: no fonts or scripts are fetched at build time.
$(VENV)/.docs-installed: $(VENV)/.installed setup.cfg constraints-ci.txt
	$(PIP) install -c constraints-ci.txt -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The numerical tests again on other CPU kernels (MKL's SSE4.2 path, one thread), the way another CPU (an AMD EPYC
# takes other MKL paths than a Xeon) or another thread count would run them: comparisons that claim bitwise
# equality must hold there too, the others are within their stated tolerances.
test-other-kernels: setup
	MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_pipeline.py tests/test_transformer.py tests/test_unet.py tests/test_edm.py \
		tests/test_scheduler_compatibility.py tests/test_embedded.py

# The Gradio Space: `make space` writes a deployable Space folder into space/ (both shipped models; pass a Hub model
# with `python space_app/build_space.py --output space --model ID`); `make demo` serves the app on 127.0.0.1:7860.
space: setup
	$(PY) space_app/build_space.py --output space

demo: setup
	$(PY) space_app/app.py

# Rebuild the shipped latent model from scratch on the CPU (about 27 minutes on 2 cores): the digits at 32 px, the
# VAE (examples/digits_vae.args), its latents, the transformer (examples/digits_latent.args, NVIDIA's ddpm-hybrid
# objective, the shipped sampling recipe via --recipe_from), then the pipeline folder replaces the weights and
# configs of diffusers_diffit/embedded/digits-latent (its model card stays).
DIGITS_LATENT_WORK ?= outputs/digits-latent
EMBEDDED_LATENT := diffusers_diffit/embedded/digits-latent
digits-latent: setup
	rm -rf $(DIGITS_LATENT_WORK)
	$(PY) examples/prepare_digits.py $(DIGITS_LATENT_WORK)/images --resolution 32
	$(PY) examples/train_autoencoder.py @examples/digits_vae.args --output_dir $(DIGITS_LATENT_WORK)/vae
	$(PY) examples/precompute_latents.py --vae $(DIGITS_LATENT_WORK)/vae --train_data_dir $(DIGITS_LATENT_WORK)/images \
		--resolution 32 --output_dir $(DIGITS_LATENT_WORK)/latents
	$(PY) examples/train_diffit.py @examples/digits_latent.args --latents_dir $(DIGITS_LATENT_WORK)/latents \
		--output_dir $(DIGITS_LATENT_WORK)/pipeline
	rm -rf $(EMBEDDED_LATENT).new && mkdir -p $(EMBEDDED_LATENT).new
	cp -r $(DIGITS_LATENT_WORK)/pipeline/model_index.json $(DIGITS_LATENT_WORK)/pipeline/scheduler \
		$(DIGITS_LATENT_WORK)/pipeline/transformer $(DIGITS_LATENT_WORK)/pipeline/vae $(EMBEDDED_LATENT)/README.md \
		$(EMBEDDED_LATENT).new/
	rm -rf $(EMBEDDED_LATENT) && mv $(EMBEDDED_LATENT).new $(EMBEDDED_LATENT)

bench: setup
	$(PY) -m benchmarks.bench_transformer

# The CPU comparison of the README: fp32, 2 threads, batch 2, against the NVIDIA-like reference, paired rounds.
bench-cpu: setup
	$(PY) -m benchmarks.bench_transformer --device cpu --threads 2 --only ours --repeats 9

# torch.compile on the CPU: cold compile time and steady-state speed of whole-model against regional compilation
# (compile_repeated_blocks), with and without inductor's freezing, against eager; XL/2 at 256 px, paired rounds.
bench-compile: setup
	$(PY) -m benchmarks.compile_study --threads 2

# Where the CPU's time goes per precision: each precision's GEMM kernels on XL/2's linear calls, and whole forwards
# of float32 (eager, regional compile) against int8 through PT2E + inductor (docs/performance.md).
bench-precision: setup
	$(PY) -m benchmarks.precision_study --threads 2 --repeats 5

# Judged quality of digits-latent quantized (torchao int8, quanto int8, int8 through PT2E), in bf16, with fp8 weight storage and with
# group offloading to disk, against fp32 in the same run, 3 seeds (docs/performance.md).
bench-quant: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.quant_study --seeds 0 1 2

# On a CUDA machine (CI has none): the tests marked `gpu`, then the GPU suite (one table, <= 8 min on an H100/H200).
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu tests
	$(PY) -m benchmarks.gpu_suite

# The suite's every code path on a tiny config, on the CPU (what `gpu-check` runs, minus the GPU).
gpu-suite-smoke: setup
	$(PY) -m benchmarks.gpu_suite --tiny --device cpu --resolutions 256 512 --dtypes bf16 --batches 1 2 --repeats 1 --window 1 --warmup 1

# sdist + wheel in dist/, `twine check`, then tests/test_packaging.py on them: a fresh venv with only the wheel samples.
dist: setup
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	DIFFIT_DIST=dist HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info space site
