# The two commands: `make test` and `make demo`. Each sets up from nothing.
# torch/torchvision are pinned and taken from this machine's local wheels by pip;
# sam2 is an sdist whose build imports torch, so it is built against the venv's torch.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lapsam-installed
# `make demo` needs only the runtime and the metrics: its own venv, no torch.
DEMO_VENV  ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.lapsam-demo-installed
DEMO_OUT   ?= demo/out
MODEL      ?= models/default
PYTEST_ARGS ?=

.PHONY: test demo venv lint clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=68" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q -e '.[all,dev]'
	touch $@

# UTF-8 mode: the tests decode their subprocesses' output (progress bars) whatever the locale.
test: $(STAMP)
	PYTHONUTF8=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lapsam distill export runtime submission eval tests

$(DEMO_STAMP): pyproject.toml
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=68" wheel
	$(DEMO_VENV)/bin/python -m pip install -q -e '.[eval]'
	touch $@

# The default model on the bundled demo cases: predict, score, one table (with box-fill), one PNG per case.
demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/lapsam eval model --cases demo/data --model $(MODEL) -o $(DEMO_OUT)

# Runtime figures of the default model (run alone on an idle machine), appended to BENCHMARKS.md.
BENCH_ARGS ?= --backends openvino --ov-precisions f32 --naive-max-pairs 400
bench: $(STAMP)
	$(VENV)/bin/lapsam bench runtime --model $(MODEL) $(BENCH_ARGS) --write BENCHMARKS.md

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(DEMO_OUT) build *.egg-info .pytest_cache
