"""The report in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
opens index.html from disk, takes a screenshot, and logs the page's console to stderr. The
screenshot must not be blank and the page must log nothing (it has no script: any console message
is an error — a blocked resource, a parse problem, an injected script).

Skipped only when chromium is missing outside CI; in CI (env CI set) a missing chromium fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]
WIDTH, HEIGHT = 1280, 2000
CONSOLE = re.compile(r":CONSOLE[:(\]]|Uncaught ")


def chromium() -> str:
    found = shutil.which("chromium") or next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser test (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browse(page: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Open `page` in headless Chromium with a screenshot; return the run and the PNG path."""
    shot = tmp_path / f"{page.stem}.png"
    profile = tmp_path / f"profile-{page.stem}"
    run = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         f"--window-size={WIDTH},{HEIGHT}", *extra, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )
    return run, shot


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def distinct_colours(png: Path) -> tuple[int, float]:
    """How many distinct colours the screenshot has, and the share of pixels that are not white."""
    import numpy as np
    from matplotlib import image

    pixels = image.imread(str(png))
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = (pixels[:, :, :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colours = len(np.unique(rgb, axis=0))
    inked = float((rgb < 245).any(axis=1).mean())
    return colours, inked


def test_the_console_check_sees_errors(tmp_path: Path) -> None:
    """A control: the detector catches what a broken page logs, so its silence on the report means
    something."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
                      "<title>x</title></head><body><p>x</p><script>console.error('boom-marker');"
                      "undefinedFunction();</script></body></html>", encoding="utf-8")
    run, _ = browse(broken, tmp_path)
    messages = console_messages(run.stderr)
    assert any("boom-marker" in m for m in messages), run.stderr[-2000:]
    assert any("undefinedFunction" in m for m in messages)


def test_report_renders_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    run, shot = browse(report_dir / "index.html", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    assert console_messages(run.stderr) == []
    colours, inked = distinct_colours(shot)
    assert colours > 200, colours  # text, links, bars, heat-map cells: far from a blank page
    assert inked > 0.05, inked


def test_report_dom_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    """The DOM Chromium built: the headings, the six inline charts, the linked numbers."""
    run = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom",
         (report_dir / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_messages(run.stderr) == []
    dom = run.stdout
    assert "<h1>Expansion report</h1>" in dom
    assert dom.count("<svg ") == 6
    assert '<a href="trail/expansion-2026-03.html">1,000.00</a>' in dom
    assert "&lt;script&gt;console.error" in dom and "<script" not in dom


def test_a_trail_page_renders(report_dir: Path, tmp_path: Path) -> None:
    run, shot = browse(report_dir / "trail" / "movements.html", tmp_path)
    assert run.returncode == 0 and console_messages(run.stderr) == []
    colours, inked = distinct_colours(shot)
    assert colours > 20 and inked > 0.02
