"""Kiln's HTML pages in a real headless browser (Debian's chromium): the DOM it built, and what its layout measured.

Without chromium a test skips, unless KILN_REQUIRE_BROWSER or CI is set (`.ci/run` installs it and sets it): then
it fails.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WIDTH, HEIGHT = 1024, 900  # the window every page is laid out in: a laptop's, not a wide monitor's
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--hide-scrollbars")  # fmt: skip
# Run in a copy of the page after everything drew (plotly too): what sticks out of the window, which scrolling
# box must scroll, which chart text leaves its chart, which tick labels overlap; appended to the DOM as JSON.
MEASURE = """<script>
addEventListener('load', () => setTimeout(() => {
  const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
    ((e.getAttribute('class') || '') ? '.' + e.getAttribute('class').split(' ')[0] : '');
  const out = {width: innerWidth, scroll_width: document.documentElement.scrollWidth, outside: [], scrolling: [],
               text_outside_chart: [], overlapping_ticks: [], charts: []};
  for (const e of document.body.querySelectorAll('*')) {
    if (e.closest('.wide') && !e.classList.contains('wide')) continue;  // inside a box that may scroll
    if (e.getBoundingClientRect().right > innerWidth + 0.5) out.outside.push(name(e));
  }
  for (const e of document.querySelectorAll('.wide'))
    if (e.scrollWidth > e.clientWidth) out.scrolling.push(name(e.firstElementChild || e));
  for (const svg of document.querySelectorAll('svg.chart')) {
    const box = svg.getBoundingClientRect();
    out.charts.push({x_ticks: [...svg.querySelectorAll('text.tick.x')].map(t => t.textContent),
                     y_ticks: [...svg.querySelectorAll('text.tick.y')].map(t => t.textContent),
                     axes: [...svg.querySelectorAll('text.axis')].map(t => t.textContent),
                     points: svg.querySelectorAll('circle').length, width: box.width});
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (r.left < box.left - 0.5 || r.right > box.right + 0.5 ||
          r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5) out.text_outside_chart.push(t.textContent);
    }
    const ticks = [...svg.querySelectorAll('text.tick')].map(t => [t.textContent, t.getBoundingClientRect()]);
    ticks.forEach(([a, p], i) => ticks.slice(i + 1).forEach(([b, q]) => {
      if (p.left < q.right && q.left < p.right && p.top < q.bottom && q.top < p.bottom)
        out.overlapping_ticks.push([a, b]);
    }));
  }
  const pre = document.createElement('pre');
  pre.id = 'kiln-measure';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500));
</script>"""


def chromium() -> str:
    """The browser's path; skips the test (fails it under KILN_REQUIRE_BROWSER or CI) when there is none."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("KILN_REQUIRE_BROWSER") or os.environ.get("CI"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return browser


def render(page: Path, scratch: Path, screenshot: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The DOM chromium built from `page` at WIDTH x HEIGHT, and the layout measured in it (MEASURE, run in a
    copy of the page beside it, so that its relative links still resolve). `screenshot`: also save the window
    showing the page itself."""
    browser = chromium()
    text = page.read_text()
    copy = page.with_name(f".measured-{page.name}")
    copy.write_text(text.replace("</body>", MEASURE + "</body>") if "</body>" in text else text + MEASURE)
    flags = [*FLAGS, f"--user-data-dir={scratch / 'profile'}", f"--window-size={WIDTH},{HEIGHT}"]
    try:
        dom = subprocess.run([browser, *flags, "--dump-dom", copy.as_uri()], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        if screenshot is not None:
            shot = subprocess.run([browser, *flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    finally:
        copy.unlink()
    found = re.search(r'<pre id="kiln-measure">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found is not None, "the measuring script did not run"
    return dom.stdout, json.loads(html.unescape(found[1]))


def fits_the_window(measured: dict[str, Any], scrolling: bool = False) -> None:
    """Nothing sticks out of the window, no table scrolls in its box (unless `scrolling`: a table as wide as its
    data, the matrix's), and no chart text leaves its chart or covers another tick label."""
    assert measured["width"] == WIDTH, measured["width"]  # laid out at the width asked for
    assert measured["scroll_width"] <= WIDTH and not measured["outside"], measured
    assert scrolling or not measured["scrolling"], measured
    assert not measured["text_outside_chart"] and not measured["overlapping_ticks"], measured
