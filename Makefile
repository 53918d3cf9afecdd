# spinestream — the two commands of the README:
#   make test   create .venv, install everything, run the test suite
#   make demo   create .venv if needed, run the main job on the embedded synthetic dataset
#
# torch and torchvision must be a matched pair (timm imports torchvision): TORCH_SPEC
# installs the pair first. DALI comes as one wheel per CUDA major (see DALI_EXTRA).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
# dali-cu13 (Turing+ with a CUDA 13 driver, and CPU-only machines) or dali-cu12
# (Pascal/P100, Volta, or a CUDA 12 driver). Detected from nvidia-smi; override with
# `make DALI_EXTRA=dali-cu12 ...`.
DALI_EXTRA  ?= $(shell bash .ci/dali-extra.sh)
DEMO_DIR    ?= demo-data

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev,$(DALI_EXTRA)]" $(TORCH_SPEC)
	touch $@

test: venv
	$(PY) -m pytest

demo: venv
	$(VENV)/bin/spinestream demo --dir $(DEMO_DIR)

bench: venv
	$(VENV)/bin/spinestream bench shard

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
