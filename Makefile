# Kiln: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
# Two workers, a test file each at a time (its module fixtures built once): most tests wait on one Python thread
# (torch.export, the ONNX exporter, process start-up), so two files at once use both cores of a CI machine.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -m "not long" -n $(TEST_WORKERS) --dist loadfile

.PHONY: install demo test test-long lint bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Pinned install: every package, direct or not, comes from constraints.txt.
$(STAMP): constraints.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "setuptools" "pip"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -c constraints.txt -e ".[dev,tpu,matrix,ray,genai,executorch]"
	touch $(STAMP)

demo: install
	$(PY) cli.py targets
	$(PY) cli.py export zoo:cnn --target all --out exports/demo --force

test: install
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests: the suite is broken" >&2; exit 1; fi; \
	exit $$status

# The tests `make test` leaves out (marked `long`: the decoder families beyond the sliding-window ones).
test-long: install
	$(PY) -m pytest -m long -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	@# mypy knows a package by its folder's name: check `kiln` through a link named so to this checkout
	mkdir -p build/mypy && ln -sfn $(CURDIR) build/mypy/kiln
	MYPYPATH=build/mypy $(VENV)/bin/mypy -p kiln

bench: install
	$(PY) benchmarks/bench_export.py

clean:
	rm -rf exports .pytest_cache .ruff_cache .mypy_cache *.egg-info
