# Set-up and checks. `make demo` and `make test` are all a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev,export,serve,track]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imgclf demo

# pytest exits 5 when no test was collected; that is a failure of the suite, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Peers for benchmarks/peers.py (fastai); never needed by the tests.
bench-deps: $(STAMP)
	$(BIN)/pip install -r benchmarks/requirements.txt

clean:
	rm -rf $(VENV) build src/*.egg-info
