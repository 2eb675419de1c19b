# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test test-slow test-eager bench clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # CPU build first, so nothing pulls a CUDA torch
	$(PY) -m pip install -q -e ".[dev,demo,plot]"
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m lorakit.demo

test: $(VENV_STAMP)
	$(PY) -m pytest -q

test-slow: $(VENV_STAMP)
	$(PY) -m pytest -q -m slow

# the mixed-batch and serving tests again on the eager path (what a machine without a C++ compiler runs)
test-eager: $(VENV_STAMP)
	LORAKIT_KERNELS=eager $(PY) -m pytest -q tests/test_routing.py tests/test_mixing.py tests/test_regional.py \
		tests/test_mm_lora.py tests/test_reclora.py tests/test_gates.py tests/test_kernels.py tests/serve

bench: $(VENV_STAMP)
	$(PY) bench/dora_layer.py
	$(PY) bench/mixed_batch.py
	$(PY) bench/minilm_train_step.py
	$(PY) bench/training_runs.py
	$(PY) bench/serve_kernels.py
	$(PY) bench/serve.py
	$(PY) bench/serve_overhead.py

clean:
	rm -rf .venv build *.egg-info
