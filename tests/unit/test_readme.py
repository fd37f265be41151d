"""The README's embedding example runs as written (in a temporary directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_embedding_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- example: tests/unit/test_readme.py runs this block -->\n```python\n(.*?)```",
                      text, re.S)
    assert match, "the README lost its embedding example"
    monkeypatch.chdir(tmp_path)
    exec(compile(match.group(1), "README.md", "exec"), {})  # noqa: S102 - our own README
    assert os.path.exists(tmp_path / "embedded-example.sqlite")
