# LangPTune-JAX developer targets. `make test` and `make demo` are the entry points.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CLI := $(VENV)/bin/langptune-jax
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# Extra pip options, e.g. PIP_INSTALL_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
PIP_INSTALL_ARGS ?=
BENCH_ARGS ?=
# Offline assets (models, MovieLens) live here; configs/demo.py reads the same variable.
LANGPTUNE_CACHE ?= $(HOME)/.cache/langptune_jax
export LANGPTUNE_CACHE
# Re-install only when the package metadata changes (keeps `make test` quick).
STAMP := $(VENV)/.install-stamp

.PHONY: venv install assets browser test demo lint bench-sampling bench-floor bench-attention bench-prepare bench-train bench-host-memory clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(PY)

$(STAMP): pyproject.toml setup.cfg | $(PY)
	$(PIP) install $(PIP_INSTALL_ARGS) -e '.[test,dev]'
	touch $@

install: $(STAMP)

assets: install
	$(CLI) assets

# The page's end-to-end test drives the Debian Chromium through its chromedriver; apt-get runs
# only when either binary is missing (as root, else through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install assets browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install assets
	$(CLI) demo --config=configs/demo.py --workdir=$(WORKDIR)

lint: install
	$(PY) -m ruff check langptune_jax tests configs bench

bench-sampling: install assets
	$(PY) bench/sampling.py $(BENCH_ARGS)

bench-floor: install
	$(PY) bench/decode_floor.py $(BENCH_ARGS)

bench-attention: install
	$(PY) bench/attention.py $(BENCH_ARGS)

bench-prepare: install assets
	$(PY) bench/prepare.py $(BENCH_ARGS)

bench-train: install assets
	$(PY) bench/train_steps.py $(BENCH_ARGS)

bench-host-memory: install assets
	$(PY) bench/host_memory.py $(BENCH_ARGS)

clean:
	rm -rf $(STAMP) build dist .pytest_cache .ruff_cache
