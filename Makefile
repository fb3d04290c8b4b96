# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-long test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch from local disk when no torch is present; an existing (e.g. CUDA) build is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,serve,video,train]"
	touch $(STAMP)

demo: $(STAMP)  # options of python -m ovis25.demo go in ARGS, e.g. make demo ARGS="--seed 1 --name seed1"
	$(PY) -m ovis25.demo $(ARGS)

# the demo at the size its targets need: the look-ups, then P2 on 252000 fresh questions, about 76 minutes here;
# 200 test questions a task
demo-long: $(STAMP)
	$(PY) -m ovis25.demo --preset long --name long --eval-limit 200 $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
