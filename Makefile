# spinestream — the two commands of the README:
#   make test   create .venv, install everything, run the test suite
#   make demo   create .venv if needed, run the whole pipeline (spinestream run -c configs/demo.yaml) on the
#               embedded synthetic dataset: demo-data/submission.csv and demo-data/report.md
#   make build-info   which torch and DALI this machine gets, and why (nothing installed)
#
# torch and torchvision must be a matched pair (timm imports torchvision): TORCH_SPEC
# installs the pair first. DALI comes as one wheel per CUDA major (DALI_EXTRA).
#
# One detection picks both (.ci/select_build.py, rules in engine/gpu_probe.py, from nvidia-smi):
#   no GPU, or Turing+ with an R580+ driver   torch from PyPI (CUDA 13.0)       dali-cu13
#   Pascal/Volta (P100, V100), or a driver     torch from TORCH_INDEX =          dali-cu12
#   older than R580 (a T4 on R550)             PyTorch's CUDA 12.6 index
#   a system torch that already computes on    venv --system-site-packages,      (as above)
#   the GPU (Kaggle)                           no torch installed
# Override any of them: make venv TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#   DALI_EXTRA=dali-cu12 USE_SYSTEM_TORCH=0 TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# (an empty TORCH_INDEX= means PyPI). torch 2.14 is the last release with a CUDA 12.6 build.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR    ?= demo-data

# The detection runs once, and only when a recipe needs one of its values (never for `make clean`);
# a USE_SYSTEM_TORCH given by the user spares it the system-torch probe (an `import torch`).
BUILD = $(eval BUILD := $$(shell $(PYTHON) .ci/select_build.py --make$(no_probe)))$(BUILD)
no_probe = $(if $(filter command line environment,$(origin USE_SYSTEM_TORCH)), --no-probe)
pick  = $(patsubst $(1)=%,%,$(filter $(1)=%,$(BUILD)))
TORCH_INDEX      ?= $(call pick,torch_index)
DALI_EXTRA       ?= $(call pick,dali_extra)
USE_SYSTEM_TORCH ?= $(call pick,system_torch)
system_torch = $(filter 1,$(USE_SYSTEM_TORCH))

.PHONY: venv test demo bench build-info clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(if $(system_torch),--system-site-packages )$(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(system_torch),$(PY) -c "import torch; print('using the system torch', torch.__version__)",$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )$(TORCH_SPEC))
	$(PY) -m pip install -e ".[dev,train,$(DALI_EXTRA)]"$(if $(system_torch),, $(TORCH_SPEC))
	touch $@

test: venv
	$(PY) -m pytest

demo: venv
	$(VENV)/bin/spinestream demo --dir $(DEMO_DIR)

bench: venv
	$(VENV)/bin/spinestream bench shard

build-info:
	@$(PYTHON) .ci/select_build.py
	@echo "make would install: $(if $(system_torch),the system torch (venv --system-site-packages),$(TORCH_SPEC) from $(or $(TORCH_INDEX),PyPI)), DALI extra $(DALI_EXTRA)"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
