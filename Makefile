# `make demo` and `make test` work from a bare clone: the first call builds .venv from the lock file,
# later calls rebuild it only when requirements-lock.txt or pyproject.toml change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Torch may use every core; the test suite runs in one process.
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(PY) sample.py --model DiT-S/4 --image-size 32 --vae none --num-classes 10 \
		--num-sampling-steps 50 --cfg-scale 1.0 --out results/demo/samples.png

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
