"""Helpers for the report tests: a book built from the fixtures — the demo book billed monthly as
`make demo` bills it, plus one customer whose strings try to break out of the HTML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from billing import service
from billing.replay import ReplayResult
from billing.scenario import parse_scenario_text

ROOT = Path(__file__).resolve().parents[2]
DEMO_BOOK = ROOT / "fixtures" / "demo" / "book.json"
# the Makefile's DEMO_RUNS: monthly invoice runs from February 2026 to January 2027
RUNS = [f"2026-{m:02d}-01T00:00:00Z" for m in range(2, 13)] + ["2027-01-01T00:00:00Z"]
HOSTILE = "o'hara & <sons>"
HOSTILE_NAME = '<script>console.error("xss")</script>'
HOSTILE_TAG = '<b onmouseover="alert(1)">smb</b>'


def demo_scenario() -> dict[str, Any]:
    """The demo book with an invoice run before the events at or after each run date (what
    `billing apply --until DAY` then `billing invoice-run --as-of DAY` do), and a customer with
    hostile strings who subscribes in October and adds seats."""
    book: dict[str, Any] = json.loads(DEMO_BOOK.read_text(encoding="utf-8"))
    hostile = [
        {"at": "2026-10-05T09:00:00Z", "type": "customer", "customer": HOSTILE, "currency": "USD",
         "name": HOSTILE_NAME, "tags": {"segment": HOSTILE_TAG}},
        {"at": "2026-10-05T09:05:00Z", "type": "subscribe", "customer": HOSTILE, "subscription": f"{HOSTILE} team",
         "plan": "team", "quantity": 2},
        {"at": "2026-10-20T09:00:00Z", "type": "change_quantity", "subscription": f"{HOSTILE} team", "quantity": 5},
    ]
    events = sorted(book["events"] + hostile, key=lambda e: e["at"])
    merged: list[dict[str, Any]] = []
    runs = list(RUNS)
    for event in events:
        while runs and event["at"] >= runs[0]:
            merged.append({"at": runs.pop(0), "type": "invoice_run"})
        merged.append(event)
    merged += [{"at": at, "type": "invoice_run"} for at in runs]
    return {"name": "demo book, billed monthly", "settings": book["settings"], "catalog": book["catalog"],
            "events": merged}


def build_demo(url: str) -> ReplayResult:
    return service.replay(parse_scenario_text(json.dumps(demo_scenario())), url)
