# Everyday commands. Nothing needs an activated virtualenv: every tool runs from .venv/bin.
#
#   make venv    create .venv and install the project with its test extras (once per pyproject)
#   make test    ruff, mypy --strict, then pytest (set BILLING_TEST_POSTGRES_URL to add PostgreSQL)
#   make demo    build demo-out/demo.sqlite from fixtures/demo/book.json and bill a year of it
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

demo: venv
	rm -rf $(DEMO_DIR)
	mkdir -p $(DEMO_DIR)
	$(BILLING) --db $(DEMO_DB) init
	$(BILLING) --db $(DEMO_DB) apply $(DEMO_BOOK)
	@set -e; for day in $(DEMO_RUNS); do \
		echo "$(BILLING) --db $(DEMO_DB) invoice-run --as-of $$day"; \
		$(BILLING) --db $(DEMO_DB) invoice-run --as-of $$day; \
	done
	$(BILLING) --db $(DEMO_DB) invoices list
	$(BILLING) --db $(DEMO_DB) movements list

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
