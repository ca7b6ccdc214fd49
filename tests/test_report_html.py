"""The self-contained HTML leaderboard: static checks, and a real headless Chromium that clicks it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
from tests.support.reports import FIXTURES, make_record

from zoo.evaluate.report import leaderboard as lb
from zoo.evaluate.report.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Appended to the generated page: clicks like a user would and writes what happened into the DOM, which
# `--dump-dom` then prints. Sorting and filtering are synchronous, so no waiting is needed.
PROBE = """<script>
(function () {
  function visible() {
    return Array.prototype.filter.call(document.querySelectorAll("#leaderboard tbody tr"), function (r) {
      return getComputedStyle(r).display !== "none";
    }).map(function (r) { return r.getAttribute("data-model"); });
  }
  function header(text) {
    return Array.prototype.filter.call(document.querySelectorAll("#leaderboard th"), function (th) {
      return th.textContent.trim() === text;
    })[0];
  }
  var out = {initial: visible()};
  header("Clean accuracy").click(); out.clean_first = visible();
  header("Clean accuracy").click(); out.clean_second = visible();
  out.aria = header("Clean accuracy").getAttribute("aria-sort");
  header("Model ID").click(); out.model_id = visible();
  var filter = document.getElementById("filter");
  filter.value = "WideResNet-70"; filter.dispatchEvent(new Event("input"));
  out.filtered = visible(); out.shown = document.getElementById("shown").textContent;
  var pre = document.createElement("pre"); pre.id = "probe-result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


@pytest.fixture
def page(tmp_path):
    root = tmp_path / "results"
    make_record(clean=8855, robust=6090, run_id="ours-2810").write(root)
    make_record(model="score-wrn-70-16", clean=8910, robust=6330, run_id="ours-7016").write(root)
    out = tmp_path / "board.html"
    assert main(["leaderboard", "--results", str(root), "--eps", "8/255", "--format", "html",
                 "--model-info", str(FIXTURES / "robustbench_model_info"), "-o", str(out)]) == 0
    return out


def test_page_is_self_contained(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text and "<script>" in text
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)  # no external resources
    assert "{{" not in text  # every placeholder filled
    assert text.count('class="score"') == 3  # our two SCORE runs + RobustBench's SCORE entry
    assert 'data-model="score-wrn-70-16"' in text and "<td>score-wrn-70-16 †</td>" in text
    assert "6 rows" in text


def test_html_escapes_text():
    entry = lb.Entry(model_id="m<1>", paper='A "quoted" <script>alert(1)</script> & co', link="https://x.org/?a=1&b=2",
                     clean=1.0, robust=0.5, architecture=None, venue=None, n_ex=None, source="s", ours=True,
                     score=False)
    board = lb.Leaderboard("cifar10", "linf", "8/255", [entry], ["note <b>"], [])
    text = lb.to_html(board)
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert 'href="https://x.org/?a=1&amp;b=2"' in text and "note &lt;b&gt;" in text
    assert 'data-model="m&lt;1&gt;"' in text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_chromium_renders_sorts_and_filters(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe output from Chromium (rc={proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    ranked = ["Wang2023Better_WRN-70-16", "Rebuffi2021Fixing_70_16_cutmix_extra", "score-wrn-70-16",
              "Pang2022Robustness_WRN28_10", "score-wrn-28-10", "Standard"]
    assert result["initial"] == ranked  # rendered rows, in leaderboard order
    by_clean = ["Standard", "Wang2023Better_WRN-70-16", "Rebuffi2021Fixing_70_16_cutmix_extra",
                "score-wrn-70-16", "Pang2022Robustness_WRN28_10", "score-wrn-28-10"]  # 94.78 ... 88.55
    assert result["clean_first"] == by_clean  # accuracy columns sort best-first on the first click
    assert result["clean_second"] == by_clean[::-1] and result["aria"] == "ascending"
    assert result["model_id"] == sorted(ranked, key=str.lower)
    assert result["filtered"] == ["Rebuffi2021Fixing_70_16_cutmix_extra", "score-wrn-70-16",
                                  "Wang2023Better_WRN-70-16"]
    assert result["shown"] == "3 of 6 rows"
