# The two README commands: `make demo` (the main job) and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine pass e.g. TORCH_SPEC=torch==2.11.0 (or an existing install is kept).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ssmrt-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ssmrt demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) demo_out *.egg-info
