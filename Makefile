# Two commands do all the set-up on a fresh machine:
#   make demo   -> builds .venv (torch CPU first, no torchvision) and runs the demo pair
#   make test   -> builds .venv if needed and runs the test suite
# Packaging (README 'Install as a package'):
#   make wheels      -> dist/promptmid-*.whl and dist/promptmid_weights-*.whl (the upstream weights lite needs)
#   make wheel-smoke -> both wheels into a fresh venv with only the CPU torch wheel, then demo + models (.ci/run)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench wheels wheel-smoke clean

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/promptmid demo --out demo_out --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py
	$(BIN)/python benchmarks/bench_realpairs.py

wheels: $(STAMP)
	rm -f dist/promptmid-*.whl dist/promptmid_weights-*.whl
	$(BIN)/pip wheel --no-deps -q -w dist .
	$(BIN)/python tools/build_weights_wheel.py --out dist

wheel-smoke: $(STAMP)
	PY=$(PY) BUILD_PY=$(BIN)/python .ci/wheel_smoke

clean:
	rm -rf $(VENV) demo_out dist build
