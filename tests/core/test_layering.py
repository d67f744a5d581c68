"""DESIGN.md's import contracts (``.importlinter``) hold, and ``lint-imports`` really catches a breach.

import-linter reads the import graph of the *installed* module names (``healthwatch.hooks`` is the
``hooks/`` folder). An editable install maps those folders in a way the graph cannot follow, so the
check lays the checkout out as the wheel does, from ``[tool.setuptools.package-dir]`` in
``pyproject.toml``, in a temporary folder that comes first on ``PYTHONPATH``, and runs
``lint-imports`` there. Each planted violation must make it fail, naming the broken contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / ".importlinter"

pytest.importorskip("importlinter", reason="import-linter (in the [dev] extra)")


def _wheel_layout(dest: Path) -> Path:
    """Copy the package's Python files to ``dest`` under their installed paths; returns ``dest``."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    # Parents first, so that a mapped subpackage (hooks/ -> healthwatch/hooks) lands inside its parent.
    for name, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*name.split("."))
        shutil.copytree(REPO / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".streamlit"))
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found next to the Python running the tests"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--config", str(CONFIG), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wheel_layout(tmp_path_factory.mktemp("wheel-layout"))


def test_the_graph_is_the_installed_package(layout: Path) -> None:
    """Guard against a vacuous pass: the copied tree is what Python imports as ``healthwatch``, and
    it holds the mapped subsystems (an editable install would show only the core folder)."""
    probe = "import healthwatch, healthwatch.hooks.monitor as m, healthwatch.alerts as a; print(healthwatch.__file__, m.__file__, a.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=layout, env={**os.environ, "PYTHONPATH": str(layout)},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert all(Path(p).is_relative_to(layout) for p in out), out


def test_contracts_hold(layout: Path) -> None:
    proc = _lint(layout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")
    contracts = (REPO / ".importlinter").read_text().count("[importlinter:contract:")
    assert f"{contracts} kept, 0 broken" in proc.stdout, proc.stdout


# (file of the installed layout, line planted in it, contract it must break)
BREACHES = [
    ("healthwatch/hooks/monitor.py", "import healthwatch.alerts.engine", "hooks import neither alerts nor the demo"),
    ("healthwatch/hooks/adapters/generic.py", "from healthwatch.demo import model", "hooks import neither alerts nor the demo"),
    ("healthwatch/schema.py", "import healthwatch.hooks.rows", "Core imports no subsystem"),
    ("healthwatch/alerts/engine.py", "import healthwatch.app.charts", "Nothing imports the app"),
    ("healthwatch/compare.py", "import healthwatch.demo.model", "Only the CLI imports the demo"),
    ("healthwatch/branch.py", "import benchmarks.bench_common", "Nothing in the package imports benchmarks"),
]


@pytest.mark.parametrize(("path", "line", "contract"), BREACHES, ids=[b[0].rsplit("/", 1)[-1] for b in BREACHES])
def test_a_planted_violation_fails(tmp_path: Path, path: str, line: str, contract: str) -> None:
    root = _wheel_layout(tmp_path / "layout")
    target = root / path
    assert target.exists(), target
    target.write_text(target.read_text() + f"\n\ndef _planted() -> None:\n    {line}  # noqa\n")
    proc = _lint(root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout


def test_store_reader_importing_the_query_layer_breaks_a_contract(layout: Path) -> None:
    """The store/query layering is checked too: a planted back-arrow breaks it."""
    target = layout / "healthwatch/store/reader.py"
    target.write_text(target.read_text() + "\nimport healthwatch.query.series  # planted\n")
    try:
        proc = _lint(layout)
        assert proc.returncode != 0 and "Core layers" in proc.stdout and "BROKEN" in proc.stdout.upper(), proc.stdout
    finally:
        target.write_text(target.read_text().replace("\nimport healthwatch.query.series  # planted\n", ""))
