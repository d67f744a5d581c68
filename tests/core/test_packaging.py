"""Both an editable install and a built wheel import every subpackage (checked once, slow)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = [
    "healthwatch",
    "healthwatch.hooks",
    "healthwatch.hooks.adapters",
    "healthwatch.app",
    "healthwatch.alerts",
    "healthwatch.demo",
    "healthwatch.store",
    "healthwatch.query",
    "healthwatch.exporters",
    "healthwatch.hooks.integrations",
    "healthwatch.cli",
]


def test_every_package_folder_is_listed_in_pyproject():
    """A package folder missing from ``[tool.setuptools] packages`` works in a checkout and is absent
    from the wheel; the folders on disk are the independent truth."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for name, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), f"package folders not in pyproject packages: {sorted(found - listed)}"


def test_editable_install_imports_every_subpackage():
    code = f"import importlib; [importlib.import_module(m) for m in {SUBPACKAGES!r}]; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_built_wheel_contains_and_imports_every_subpackage(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("healthwatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES[:-1]:
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, pkg
    # The demo model's adapter ships with the demo; the browser/server test harness does not ship.
    assert "healthwatch/demo/adapter.py" in names
    assert not [n for n in names if n.endswith(("app/serve.py", "adapters/reference.py", "apphost.py"))]
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/"))]
    for pack in (ROOT / "alerts" / "packs").glob("*.yaml"):
        assert f"healthwatch/alerts/packs/{pack.name}" in names, pack.name
    # Import from the unpacked wheel, not from the source tree (cwd and path point elsewhere).
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import importlib; "
        f"mods = [importlib.import_module(m) for m in {SUBPACKAGES!r}]; "
        f"assert all(m.__file__.startswith({str(target)!r}) for m in mods), [m.__file__ for m in mods]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # auto_adapter finds the demo's adapter from the wheel too (through healthwatch.plugins), and a
    # Monitor(alerts="default") builds the alert evaluator without the hooks importing alerts.
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import healthwatch as hw; "
        "from healthwatch.demo.model import HybridConfig, HybridLM; "
        "from healthwatch.hooks.adapters import auto_adapter; "
        "a = auto_adapter(HybridLM(HybridConfig())); assert type(a).__module__ == 'healthwatch.demo.adapter', a; "
        f"m = hw.Monitor(store={str(tmp_path / 'store')!r}, run='w', alerts='default'); "
        "assert [type(o).__name__ for o in m.writer.after_flush] == ['MonitorEvaluator']; m.close(); "
        "from healthwatch.cli import app; "
        "assert 'bench' not in [c.name or c.callback.__name__ for c in app.registered_commands]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
