"""`curate report`: a self-contained HTML page, checked in a real headless browser (Debian's chromium)."""

import shutil

import pytest

from conftest import ROOT, run_curate
from curate.report import CHARTS
from curate.stats import scored_stats

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's probe starts it: no sandbox (root), and no background calls to a network that is not there.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (make browser)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, path):
    """Open a local page with every non-file request refused; returns (page, errors seen)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
               else (requests.append(route.request.url), route.abort()))
    page.goto(path.as_uri())
    page.wait_for_selector(f"#{CHARTS[-1]} .main-svg")
    return page, errors, requests


@pytest.mark.slow
def test_comparison_report_renders_its_charts_in_a_real_browser(tmp_path, browser, scored_sample, scored_generated):
    report = tmp_path / "compare.html"
    run_curate("report", scored_sample, scored_generated, "-o", report, "--threshold", "2.5")
    page_html = report.read_text()
    assert "<script src=" not in page_html, "plotly.js is inlined, not fetched"

    page, errors, requests = _open(browser, report)
    assert errors == [] and page.evaluate("window.curateErrors") == []
    assert requests == [], "the page needs no network"
    for chart in CHARTS:
        assert page.locator(f"#{chart} .main-svg").count() > 0, f"chart {chart} rendered"
        assert page.locator(f"#{chart} .scatterlayer .trace").count() == 2, "both sets drawn in each chart"
    rows = page.locator("#summary tr").all_inner_texts()
    assert len(rows) == 3
    for row, directory in zip(rows[1:], (scored_sample, scored_generated)):
        assert f"{scored_stats(directory).token_ppl:.3f}" in row
    assert page.locator(".example").count() == 12, "six examples per set"
    assert page.locator(".example s.tok").count() > 0, "masked tokens are struck through"
    assert page.locator("table.tokens").count() == 2

    screenshot = tmp_path / "compare.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000
    artifacts = ROOT / "out" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, artifacts / "report-compare.png")


def test_single_set_report_marks_the_chosen_threshold(tmp_path, browser, scored_sample):
    report = tmp_path / "report.html"
    run_curate("report", scored_sample, "-o", report, "--threshold", "3", "--examples", "2")
    page, errors, requests = _open(browser, report)
    assert errors == [] and requests == []
    for chart in CHARTS:
        assert page.locator(f"#{chart} .scatterlayer .trace").count() == 1
        assert "τ = 3" in page.locator(f"#{chart}").inner_text(), "the chosen τ is marked on every chart"
    assert page.locator(".example").count() == 2
    assert "masked at τ = 3" in page.locator("#summary").inner_text()


def test_report_refuses_a_set_scored_with_another_tokenizer(tmp_path, scored_sample, model_dir):
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("*.safetensors"))
    template = other / "chat_template.jinja"  # another chat template is another tokenization
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> ", 1))
    result = run_curate("report", scored_sample, "-o", tmp_path / "r.html", "--model", other, check=False)
    assert result.returncode == 1 and "another tokenizer" in result.stderr
