# Two entry points on a fresh machine: `make demo` (the main job on the
# embedded digits data) and `make test` (the test suite). Both create .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := torch torchvision numpy scikit-learn tqdm matplotlib pytest pytest-benchmark hypothesis ninja
STAMP  := $(VENV)/.deps-installed

.PHONY: venv build test demo bench clean

$(STAMP): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(DEPS)
	touch $(STAMP)

venv: $(STAMP)

# The extension builds against the venv's torch: no build isolation (it would
# download another multi-GB torch).
build: $(STAMP)
	$(BIN)/pip install -e . --no-build-isolation --no-deps

test: build
	$(BIN)/python -m pytest python_tests/ -q

demo: build
	$(BIN)/python -m instdisc_kernels.demo

bench: build
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf build *.egg-info instdisc_kernels/_C*.so
