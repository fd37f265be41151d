# Everyday commands. Nothing needs an activated virtualenv: every tool runs from .venv/bin.
#
#   make venv    create .venv and install the project with its test extras (once per pyproject)
#   make test    ruff, mypy --strict, then pytest (set BILLING_TEST_POSTGRES_URL to add PostgreSQL)
#   make demo    build demo-out/demo.sqlite from fixtures/demo/book.json, billing it monthly for a year
#   make clean   remove the virtualenv, caches and demo output

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BILLING := $(BIN)/billing

# The install is redone only when pyproject.toml changes: the stamp's name carries its hash.
PYPROJECT_HASH := $(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)

DEMO_DIR := demo-out
DEMO_DB := sqlite:///$(DEMO_DIR)/demo.sqlite
DEMO_BOOK := fixtures/demo/book.json
# Monthly invoice runs from February 2026 to January 2027 (the book starts in January 2026).
DEMO_RUNS := 2026-02-01 2026-03-01 2026-04-01 2026-05-01 2026-06-01 2026-07-01 \
             2026-08-01 2026-09-01 2026-10-01 2026-11-01 2026-12-01 2027-01-01

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

test: venv
	$(BIN)/ruff check billing expansion tests
	$(BIN)/mypy --strict billing expansion
	$(BIN)/pytest

# The book's clock only moves forward, so the demo applies the book in slices between the monthly
# runs: `apply --until DAY` applies the events before DAY not applied yet, then the run bills DAY.
demo: venv
	rm -rf $(DEMO_DIR)
	mkdir -p $(DEMO_DIR)
	$(BILLING) init --db $(DEMO_DB)
	@set -e; for day in $(DEMO_RUNS); do \
		echo "== $(BILLING) apply $(DEMO_BOOK) --until $$day; $(BILLING) invoice-run --as-of $$day"; \
		$(BILLING) apply $(DEMO_BOOK) --until $$day --db $(DEMO_DB) | grep -v "already applied" || true; \
		$(BILLING) invoice-run --as-of $$day --quiet --db $(DEMO_DB); \
	done
	$(BILLING) apply $(DEMO_BOOK) --db $(DEMO_DB) | grep -v "already applied" || true
	$(BILLING) invoices list --db $(DEMO_DB)
	$(BILLING) movements list --db $(DEMO_DB)
	$(BILLING) report --out $(DEMO_DIR)/report --db $(DEMO_DB)

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
