# Set-up contract: `make demo` and `make test` work on a fresh machine with Python, pip and
# (for Fashion-MNIST) root apt. Both are idempotent and fast once set up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pnnh-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

# Debian's dataset-fashion-mnist; without root apt the demo falls back to sklearn digits.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: apt-get could not install dataset-fashion-mnist"; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: apt-get could not install dataset-fashion-mnist"; \
	  else \
	    echo "note: Fashion-MNIST not installed and no root apt; install dataset-fashion-mnist or use --data-dir"; \
	  fi; \
	fi

demo: setup data
	$(VENV)/bin/pnnh demo

test: setup data
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs
