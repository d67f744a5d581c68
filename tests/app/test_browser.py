"""End to end: the real Streamlit server in a real headless Chromium, including live refresh."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WRITER = '''
import sys, time, torch
import healthwatch as hw
sys.path.insert(0, {core!r})
from toymodel import ToyLM
m = ToyLM()
with hw.Monitor(store={store!r}, run="live", flush_every_steps=5, flush_every_s=0.5) as mon:
    mon.watch(m)
    for step in range(100000):
        out = m(torch.randint(0, 32, (1, 8))).sum()
        out.backward(); mon.after_backward()
        mon.step(step, tokens=8 * (step + 1), loss=out.detach() * 0 + 1.0 / (step + 1))
        time.sleep(0.02)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def server(app_store):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "healthwatch.cli", "app", "--store", str(app_store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 60, "the Streamlit server")
        yield f"http://127.0.0.1:{port}", app_store
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2000",
                f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _plots(driver) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))


def _no_exception(driver) -> None:
    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


@pytest.mark.parametrize("page,min_plots", [("", 0), ("run", 6), ("alerts", 1), ("compare", 0)])
def test_every_page_renders(server, browser, page, min_plots):
    url, _store = server
    browser.get(f"{url}/{page}")
    WebDriverWait(browser, 60).until(
        lambda d: _plots(d) >= max(1, min_plots) if min_plots else d.find_elements(By.CSS_SELECTOR, "h1")
    )
    _no_exception(browser)


def test_live_chart_grows_without_reload(server, browser, tmp_path):
    url, store = server
    core = str(Path(__file__).resolve().parents[1] / "core")
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(core=core, store=str(store)))
    writer = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait(lambda: (store / "table=scalars" / "run=live").is_dir(), 60, "the writer's first flush")
        browser.get(f"{url}/run?run=live")
        count_js = ("const p = document.querySelectorAll('.js-plotly-plot')[0];"
                    "if (!p || !p.data) return 0; const t = p.data.find(t => t.name === 'loss/train');"
                    "return t ? t.x.length : 0;")
        first = _wait(lambda: browser.execute_script(count_js), 60, "the live loss chart")
        url_before = browser.current_url
        grown = _wait(lambda: (n := browser.execute_script(count_js)) > first and n, 60, "new points in the live chart")
        assert grown > first and browser.current_url == url_before
        _no_exception(browser)
    finally:
        writer.terminate()
        writer.wait(20)
