# The two commands: `make test` and `make demo`. Each sets up from nothing.
# torch/torchvision are pinned and taken from this machine's local wheels by pip;
# sam2 is an sdist whose build imports torch, so it is built against the venv's torch.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lapsam-installed
PYTEST_ARGS ?=

.PHONY: test demo venv lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=68" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q -e '.[all,dev]'
	touch $@

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lapsam distill export runtime submission eval tests

demo: $(STAMP)
	$(VENV)/bin/lapsam data inspect demo/data/imgs demo/data/extra

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
