# One place for every set-up and check. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo

.PHONY: install demo central data test lint unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

data: install
	$(BIN)/fedrec data fetch ml-100k

demo: data
	$(BIN)/fedrec simulate --config simulations/configs/ml100k.toml --out $(RUN) --force

central: data
	$(BIN)/fedrec train-central --dataset ml-100k --model multvae --out runs/central

bench: install
	$(BIN)/python -m simulations.bench_central --seeds 0 1 2
	$(BIN)/python -m simulations.bench_federated --rounds 8

lint: install
	$(BIN)/ruff check common server client simulations tests
	$(BIN)/ruff format --check common server client simulations tests
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

test: lint unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
