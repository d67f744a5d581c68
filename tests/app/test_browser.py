"""End to end: the real server (``healthwatch app``) in a real headless Chromium, every page, and
live refresh while a writer process appends steps."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

from _deps import require  # noqa: E402

require("chromium", "Debian chromium (apt-get install -y chromium chromium-driver)")
require("chromedriver", "Debian chromium-driver (apt-get install -y chromium chromium-driver)")
require("selenium", "selenium (in the [dev] extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from benchmarks.apphost import CHROMIUM, DRIVER, start_app, stop, wait_for  # noqa: E402

# Appends 5 steps of every scalar family to run `live` every 0.3 s through the real StoreWriter.
WRITER = """
import sys, time
import numpy as np
from healthwatch.store import StoreWriter
root, step = sys.argv[1], int(sys.argv[2])
w = StoreWriter(root, "live", attempt=1, rank=1)
while True:
    s = np.arange(step, step + 5, dtype=np.int64)
    names = ["loss/train", "loss/mtp_1"]
    w.write("scalars", {"attempt": np.ones(10, dtype=np.int32), "step": np.tile(s, 2), "tokens": np.tile(s * 64, 2),
                        "name": np.repeat(names, 5), "value": np.tile(3.0 - s * 1e-3, 2),
                        "wall_time": np.full(10, time.time())})
    step += 5
    time.sleep(0.3)
"""


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    """``healthwatch app --store S --port P`` as a subprocess; returns it and its URL once healthy."""
    return start_app(store, timeout=90)


def chrome(user_data: Path, size: str = "1400,1800") -> webdriver.Chrome:
    """Headless Chromium with a fresh profile and no background traffic."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--window-size={size}", f"--user-data-dir={user_data}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


@pytest.fixture(scope="module")
def server(app_store: Path) -> Iterator[str]:
    proc, url = start_server(app_store)
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    driver = chrome(tmp_path_factory.mktemp("chrome"))
    try:
        yield driver
    finally:
        driver.quit()


PLOTS_JS = "return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p.data).length"
RUNNING_JS = "return !!document.querySelector('[data-testid=\"stStatusWidget\"]')"


def no_exception(driver: webdriver.Chrome) -> None:
    """No Streamlit exception element and no traceback text on the page."""
    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


@pytest.mark.parametrize("path,title,plots", [
    ("", "Runs", 1), ("run?run=main", "Run", 3), ("divergence?run=main", "Divergence", 1),
    ("compare", "Compare", 0), ("alerts", "Alerts", 1),
])
def test_every_page_renders(server: str, browser: webdriver.Chrome, path: str, title: str, plots: int) -> None:
    browser.get(f"{server}/{path}")
    wait_for(lambda: any(h.text == title for h in browser.find_elements(By.CSS_SELECTOR, "h1")), 60, f"the {title} title")
    if plots:
        wait_for(lambda: browser.execute_script(PLOTS_JS) >= plots, 90, f"{plots} plotly charts on {title}")
    wait_for(lambda: not browser.execute_script(RUNNING_JS), 60, "the script run to finish")
    no_exception(browser)


# Drawn charts' titles (Streamlit's theme wraps a title in <b> tags: stripped).
PLOT_TITLES_JS = ("return Array.from(document.querySelectorAll('.js-plotly-plot'))"
                  ".filter(p => p._fullData && p.querySelector('.main-svg'))"
                  ".map(p => p.layout.title.text.replace(/<\\/?b>/g, ''))")
HEATMAPS = {"MaxVio by layer and step", "Residual RMS by layer and step", "Weight-gradient norm by layer and step"}


def test_run_page_sections_load_when_opened(server: str, browser: webdriver.Chrome) -> None:
    """A first load draws the Overview only; clicking the Layers tab draws its heatmaps and dead
    experts (queried and sent only then) and puts the section in the URL; that URL opens it again."""
    browser.get(f"{server}/run?run=main")
    wait_for(lambda: browser.execute_script(PLOTS_JS) >= 3, 90, "the Overview charts")
    wait_for(lambda: not browser.execute_script(RUNNING_JS), 60, "the script run to finish")
    first = set(browser.execute_script(PLOT_TITLES_JS))
    assert "Train loss and every MTP head" in first and not first & HEATMAPS
    tab = next(t for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stTab']") if t.text == "Layers")
    tab.click()
    drawn = wait_for(lambda: (got := set(browser.execute_script(PLOT_TITLES_JS))) >= HEATMAPS and got, 90,
                     "the Layers heatmaps after the click")
    assert "Dead experts (no tokens over the trailing window)" in drawn
    wait_for(lambda: not browser.execute_script(RUNNING_JS), 60, "the script run to finish")
    no_exception(browser)
    heat = browser.execute_script(
        "const p = Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".find(p => p.layout.title.text.includes('Residual RMS by layer and step'));"
        "const t = p._fullData[0]; return {type: t.type, rows: t.z.length, cols: t.z[0].length};")
    assert heat["type"] == "heatmap" and heat["rows"] == 4 and heat["cols"] >= 2  # the test store's 4 layers
    assert "section=Layers" in browser.current_url
    browser.get(browser.current_url)  # the URL is a link to the section
    wait_for(lambda: set(browser.execute_script(PLOT_TITLES_JS)) >= HEATMAPS, 90, "the Layers heatmaps from the URL")


def test_divergence_page_in_the_browser(server: str, browser: webdriver.Chrome) -> None:
    """The Divergence page as a user sees it: the z-score chart drawn with every chosen signal and
    the band, the first mover named with its lead over the train loss, and a rollback suggestion."""
    browser.get(f"{server}/divergence?run=main")
    wait_for(lambda: browser.execute_script(PLOTS_JS) >= 1, 90, "the z-score chart")
    wait_for(lambda: not browser.execute_script(RUNNING_JS), 60, "the script run to finish")
    no_exception(browser)
    chart = browser.execute_script(
        "const p = document.querySelector('.js-plotly-plot');"
        "return {title: p.layout.title.text, y: p.layout.yaxis.title.text, x: p.layout.xaxis.title.text,"
        " names: p._fullData.filter(t => t.showlegend !== false).map(t => t.name),"
        " shapes: (p.layout.shapes || []).length, labels: (p.layout.annotations || []).map(a => a.text)}")
    assert "robust z-score" in chart["title"] and "signed log" in chart["y"] and chart["x"] == "training step"
    assert {"loss/train", "loss/mtp_2"} <= set(chart["names"])
    assert any(label.startswith("first mover: resid_rms") for label in chart["labels"])
    assert "rollback point" in chart["labels"] and chart["shapes"] >= 3  # band lines + vertical marks
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "moved first" in body and "steps" in body and "before the train loss" in body
    assert "Rollback suggestion: the checkpoint at step 100" in body


def test_live_chart_grows_without_reload(tmp_path: Path) -> None:
    store = tmp_path / "live-store"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store), "0"])
    proc = driver = None
    try:
        wait_for(lambda: (store / "table=scalars" / "run=live").is_dir(), 60, "the writer's first segment")
        from healthwatch.store import StoreWriter

        StoreWriter(store, "live").write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None],
                                                  "precision": ["bf16"], "config": ["{}"], "created": [time.time()],
                                                  "schema_version": ["1.0"]})
        proc, url = start_server(store)
        driver = chrome(tmp_path / "chrome")
        driver.get(f"{url}/run?run=live")
        # _fullData holds the decoded arrays (figures travel as binary numpy arrays, which stay
        # {dtype, bdata} objects in `data`).
        count_js = ("const p = document.querySelectorAll('.js-plotly-plot')[0];"
                    "if (!p || !p._fullData) return 0; const t = p._fullData.find(t => t.name === 'loss/train');"
                    "return t && t.x ? t.x.length : 0;")
        first = wait_for(lambda: driver.execute_script(count_js), 90, "the live loss chart")
        driver.execute_script("window.__hw_marker = 'same page';")  # a reload would wipe it
        grown = wait_for(lambda: (n := driver.execute_script(count_js)) > first and n, 60,
                         "new points in the live chart")
        assert grown > first
        assert driver.execute_script("return window.__hw_marker") == "same page"
        no_exception(driver)
    finally:
        if driver is not None:
            driver.quit()
        if proc is not None:
            stop(proc)
        stop(writer)


def test_bench_render_load_waits_in_the_page_for_the_drawn_charts(server: str, browser: webdriver.Chrome) -> None:
    """bench_render.load (the benchmark's clock) returns once the page's title, its charts and the end of
    the script run are all seen, and times out when asked for a chart more than the page draws."""
    from benchmarks.bench_render import load

    assert load(browser, f"{server}/run?run=main", "Run", 3, timeout=120) > 0
    assert browser.execute_script(PLOTS_JS) >= 3 and not browser.execute_script(RUNNING_JS)
    with pytest.raises(TimeoutError, match="4 drawn charts"):
        load(browser, f"{server}/run?run=main", "Run", 4, timeout=15)
