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

# The book's clock only moves forward (an invoice run can't be dated before an event already
# applied), so the demo applies the book month by month: the events before each run, then the run.
# SPLIT_BOOK writes those slices as demo-out/events-K.json (K = the run they come before; the last
# K holds anything after the last run), each a scenario file with the book's catalog and settings.
define SPLIT_BOOK
import bisect, json, sys
from datetime import datetime, timezone
book_path, out_dir, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
def instant(text):
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
with open(book_path) as f:
    book = json.load(f)
cuts = [instant(day) for day in runs]
slices = {}
for event in book["events"]:
    slices.setdefault(bisect.bisect_right(cuts, instant(event["at"])), []).append(event)
for k, events in slices.items():
    with open(f"{out_dir}/events-{k}.json", "w") as f:
        json.dump(dict(book, events=events), f, indent=1)
endef
export SPLIT_BOOK

demo: venv
	rm -rf $(DEMO_DIR)
	mkdir -p $(DEMO_DIR)
	$(BIN)/python -c "$$SPLIT_BOOK" $(DEMO_BOOK) $(DEMO_DIR) $(DEMO_RUNS)
	$(BILLING) init --db $(DEMO_DB)
	@set -e; k=0; for day in $(DEMO_RUNS) end; do \
		if [ -f $(DEMO_DIR)/events-$$k.json ]; then \
			echo "$(BILLING) apply $(DEMO_DIR)/events-$$k.json --db $(DEMO_DB)"; \
			$(BILLING) apply $(DEMO_DIR)/events-$$k.json --db $(DEMO_DB); \
		fi; \
		if [ $$day != end ]; then \
			echo "$(BILLING) invoice-run --as-of $$day --db $(DEMO_DB)"; \
			$(BILLING) invoice-run --as-of $$day --db $(DEMO_DB); \
		fi; \
		k=$$((k + 1)); \
	done
	$(BILLING) invoices list --db $(DEMO_DB)
	$(BILLING) movements list --db $(DEMO_DB)

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
