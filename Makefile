# `make demo` and `make test` work from a bare clone: the first call builds .venv from the lock file,
# later calls rebuild it only when requirements-lock.txt or pyproject.toml change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Torch may use every core outside the tests; under pytest-xdist each worker takes its share (tests/conftest.py).
export OMP_NUM_THREADS ?= 2
# Test files run in parallel, one worker per core, a file per worker (its module fixtures are built once).
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The digits demo's teacher: train.py's exact flags (recorded with the shipped file by demo.py --export-teacher).
# The thread count is pinned: it changes the rounding of CPU matrix products, so the run repeats bit for bit only
# with the same count. OMP_WAIT_POLICY=PASSIVE does not change any number; it keeps OpenMP threads from spinning,
# which on a busy 2-core machine made steps several times slower.
TEACHER_STEPS := 3000
TEACHER_FLAGS := --model DiT-Digits/2 --data-path data/digits/train --image-size 8 --num-classes 10 \
	--global-batch-size 128 --max-steps $(TEACHER_STEPS) --lr 1e-3 --lr-min 1e-5 --warmup-steps 200 \
	--ema-decay 0.999 --global-seed 0 --num-workers 0 --log-every 100 --ckpt-every 1000 --precision fp32 \
	--device cpu --results-dir outputs/teacher --prefix digits
TEACHER_CKPT := outputs/teacher/digits-DiT-Digits-2/checkpoints/$(shell printf '%07d' $(TEACHER_STEPS)).pt
DEMO_ENV := OMP_WAIT_POLICY=PASSIVE

.PHONY: setup demo bench teacher demo-aptp aptp-teacher test test-fast lint format clean

setup: $(STAMP)

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The digits pipeline with the shipped teacher (assets/digits): prune 12 -> 6 layers four ways, fine-tune,
# sample, evaluate; writes outputs/demo/report.md. `make bench`: 3 seeds, longer, more patterns (outputs/bench).
demo: setup
	$(DEMO_ENV) $(PY) demo.py

bench: setup
	$(DEMO_ENV) $(PY) demo.py --bench

# Re-train the shipped teacher (33 min on 2 cores shared with other work) and re-export assets/digits/teacher.safetensors.
teacher: setup
	rm -rf outputs/teacher
	$(PY) prepare_digits.py --out data/digits
	$(DEMO_ENV) OMP_NUM_THREADS=2 $(PY) train.py $(TEACHER_FLAGS)
	$(DEMO_ENV) OMP_NUM_THREADS=2 $(PY) demo.py --export-teacher $(TEACHER_CKPT) \
		--command "OMP_NUM_THREADS=2 python train.py $(strip $(TEACHER_FLAGS))"

# APTP on captioned digits with the shipped teacher (assets/aptp-digits): prune into experts, filter, fine-tune each,
# routed generation, scores; writes outputs/demo-aptp/report.md.
demo-aptp: setup
	$(DEMO_ENV) $(PY) demo_aptp.py

# Re-train the captioned-digits teacher (its VAE, then its UNet by aptp.finetune; about 80 min on 2 shared cores) and
# re-export assets/aptp-digits.
aptp-teacher: setup
	rm -rf outputs/aptp-teacher
	$(DEMO_ENV) OMP_NUM_THREADS=2 $(PY) demo_aptp.py --train-teacher

# The whole suite (what .ci/run calls), and the inner loop: the tests that start no process (tests/conftest.py).
test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info outputs/demo outputs/bench outputs/quick outputs/demo-aptp
