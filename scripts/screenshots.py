"""Screenshots of every app page for the docs, taken from the real server in headless Chromium.

Usage (from the repository root)::

    healthwatch demo --quick --no-app --store /tmp/shots-store     # about a minute
    python scripts/screenshots.py --store /tmp/shots-store --out docs

Each page is loaded, the script waits until the page's title is shown, its plotly charts are drawn
and no script run is in flight, then grows the window to the page's full height and saves a PNG
(``docs/app-<page>.png``, 1400 px wide). It fails, naming the page, on any Streamlit exception.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apphost import app_server, wait_for  # noqa: E402
from benchmarks.apphost import headless_chromium as chromium  # noqa: E402
from benchmarks.bench_render import DRAWN_JS, EXCEPTION_JS, page_ready  # noqa: E402

#: (file stem, URL path, page title, minimum number of drawn charts); ``{run}`` is filled in.
PAGES = (
    ("runs", "", "Runs", 1),
    ("run", "run?run={run}", "Run", 8),
    ("divergence", "divergence?run={run}", "Divergence", 1),
    ("alerts", "alerts", "Alerts", 1),
    ("compare", "compare", "Compare", 2),
)
WIDTH = 1400
MAX_HEIGHT = 9000
#: The scrolling container of a Streamlit page (the document itself does not scroll).
HEIGHT_JS = """
const el = document.querySelector('[data-testid="stMain"]') || document.querySelector('section.main');
const inner = document.querySelector('[data-testid="stMainBlockContainer"]');
return Math.ceil(Math.max(el ? el.scrollHeight : 0, inner ? inner.getBoundingClientRect().height + 80 : 0,
                          document.body.scrollHeight));
"""


def settle(driver: object, title: str, charts: int, timeout: float = 180.0) -> None:
    """Wait for the page to be ready and its chart count to be stable for a second."""
    wait_for(lambda: page_ready(driver, title, charts) or driver.execute_script(EXCEPTION_JS), timeout,
             f"{charts} charts on the {title} page")
    if driver.execute_script(EXCEPTION_JS):
        raise RuntimeError(f"exception on the {title} page:\n" + driver.find_element("tag name", "body").text[:3000])
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 1.0:
        n = driver.execute_script(DRAWN_JS)
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.1)


def shoot(store: Path, out: Path, run: str | None = None, height: int = 1000) -> list[Path]:
    """Save one PNG per page of the app serving ``store`` into ``out``; returns the paths."""
    import healthwatch as hw

    if run is None:
        s = hw.open_store(store)
        roots = s.sql("SELECT run FROM runs WHERE parent IS NULL ORDER BY created").fetchall()
        run = roots[0][0] if roots else "main"
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with app_server(store) as url, chromium((WIDTH, height)) as driver:
        for stem, path, title, charts in PAGES:
            driver.set_window_size(WIDTH, height)
            driver.get(f"{url}/{path.format(run=run)}")
            settle(driver, title, charts)
            full = min(MAX_HEIGHT, max(height, int(driver.execute_script(HEIGHT_JS))))
            if full > height:
                driver.set_window_size(WIDTH, full)
                settle(driver, title, charts)  # charts re-lay out to the new size
            target = out / f"app-{stem}.png"
            driver.save_screenshot(str(target))
            saved.append(target)
            print(f"{target} ({WIDTH}x{full})", flush=True)
    return saved


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="a store with runs (e.g. from `healthwatch demo`)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--run", default=None, help="run shown on the Run and Divergence pages (default: first root run)")
    args = ap.parse_args(argv)
    shoot(args.store, args.out, args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
