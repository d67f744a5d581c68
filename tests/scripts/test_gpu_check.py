"""CPU-side logic of ``scripts/gpu_check.sh`` / ``scripts/gpu_check.py``: arguments, the result JSON and
Markdown, and a clear, quick failure on a machine without CUDA (this one)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"
SHELL = REPO / "scripts" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


gc = _load()


# -- arguments -------------------------------------------------------------------------------------


def test_defaults_use_OUT_then_local_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OUT", raising=False)
    args = gc.parse_args([])
    assert args.out == Path("./gpu-check-out")
    assert args.sections == list(gc.SECTIONS)
    assert args.budget_s == gc.DEFAULT_BUDGET_S and not args.probe_only
    monkeypatch.setenv("OUT", str(tmp_path / "dev-out"))
    assert gc.parse_args([]).out == tmp_path / "dev-out"
    assert gc.parse_args(["--out", "x"]).out == Path("x")  # an explicit --out wins over $OUT


def test_sections_are_validated_and_run_in_fixed_order() -> None:
    args = gc.parse_args(["--sections", "peers, env ,overhead"])
    assert args.sections == ["env", "overhead", "peers"]


@pytest.mark.parametrize("argv, message", [
    (["--sections", "env,gpu_magic"], "unknown section(s) ['gpu_magic']"),
    (["--sections", ","], "unknown section"),
    (["--budget-s", "-5"], "must be a positive number of seconds"),
    (["--budget-s", "soon"], "not a number: 'soon'"),
    (["--budget-s", "nan"], "must be a positive number"),
    (["--section", "env"], "--section needs --result and --workdir"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# -- result format ---------------------------------------------------------------------------------


def _synthetic() -> dict:
    sections = {
        "env": gc.section_result("pass", "", {"device": "NVIDIA H200", "torch": "2.13.0", "cuda": "12.8"}, 3.2, 60),
        "nosync_reference": gc.section_result(
            "fail", "2 host sync(s) in the Monitor's code: collector.py:120 in hook",
            {"sync_failures": 2, "checked_steps": 13,
             "failures": [{"step": 0, "where": "collector.py:120 in hook", "error": "called a synchronizing CUDA operation"},
                          {"step": 1, "where": "collector.py:120 in hook", "error": "called a synchronizing CUDA operation"}]},
            20.5, 120),
        "overhead": gc.section_result("pass", "", {"overhead_pct": 0.42, "ci_pct": [0.1, 0.8], "step_ms_a": 61.3}, 80.0, 150),
        "peers": gc.section_result("pass", "", {"per_step_ms": {"healthwatch": 0.3, "tensorboard": 21.0, "wandb": 4.5}},
                                   30.0, 150),
        "mamba_install": gc.section_result("skip", "mamba-ssm did not install (exit 1); the pure-torch SSD path is used"),
    }
    status, reason = gc.overall_status(sections, cuda_available=True)
    return {"schema": gc.RESULT_SCHEMA, "status": status, "reason": reason, "started_at": "2026-12-02T20:00:00+00:00",
            "finished_at": "2026-12-02T20:06:00+00:00", "elapsed_s": 360.0, "commit": "abc1234",
            "install": {"healthwatch": "ok", "transformers": "ok"},
            "cuda": {"available": True, "device": "NVIDIA H200", "torch": "2.13.0", "cuda": "12.8"},
            "sections": sections}


def test_result_json_and_markdown_from_a_synthetic_result(tmp_path: Path) -> None:
    result = _synthetic()
    assert (result["status"], result["reason"]) == ("fail", "section(s) failed: nosync_reference")
    json_path, md_path = gc.write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    md = md_path.read_text()
    assert "**Result: FAIL** — section(s) failed: nosync_reference" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"section", "env", "nosync_reference", "overhead", "peers", "mamba_install"}
    assert "| fail | 20.5 s | 2 syncs in 13 non-flush steps; 2 host sync(s)" in rows["nosync_reference"]
    assert "+0.42 % (95 % CI +0.10..+0.80) at 61.3 ms/step" in rows["overhead"]
    assert "healthwatch 0.30 ms, tensorboard 21.00 ms, wandb 4.50 ms" in rows["peers"]
    assert "| skip | – | mamba-ssm did not install" in rows["mamba_install"]
    assert "NVIDIA H200 (torch 2.13.0, CUDA 12.8)" in rows["env"]
    # Each sync is listed with its step and the line that made it.
    assert "- nosync_reference, step 1: `collector.py:120 in hook`" in md
    assert "healthwatch commit abc1234" in md and "Installs: healthwatch ok, transformers ok" in md


def test_overall_status_rules() -> None:
    ok = gc.section_result("pass")
    skip = gc.section_result("skip", "not installed")
    fail = gc.section_result("fail", "boom")
    assert gc.overall_status({"env": ok, "peers": skip}, True) == ("pass", "")
    assert gc.overall_status({"env": ok, "peers": fail}, True) == ("fail", "section(s) failed: peers")
    assert gc.overall_status({"env": skip}, True) == ("fail", "no section passed")
    assert gc.overall_status({"env": ok}, False) == ("fail", "CUDA is not available")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("cuda"), "missing key 'cuda'"),
    (lambda r: r.update(status="maybe"), "status 'maybe' is not pass/fail"),
    (lambda r: r["sections"].update(bogus=gc.section_result("pass")), "unknown section 'bogus'"),
    (lambda r: r["sections"]["peers"].update(status="skip", reason=""), "section 'peers' is skip without a reason"),
    (lambda r: r.update(schema=99), "schema 99"),
])
def test_invalid_results_are_refused_by_name(change, message: str, tmp_path: Path) -> None:
    result = _synthetic()
    change(result)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gc.write_outputs(result, tmp_path)
    assert not (tmp_path / gc.RESULT_FILE).exists()
    with pytest.raises(ValueError, match="section status must be one of"):
        gc.section_result("flaky")


# -- no CUDA here: fail clearly and quickly --------------------------------------------------------

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full check would run")


def _check_no_cuda_result(out: Path, proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == gc.EXIT_NO_CUDA, proc.stdout + proc.stderr
    assert "gpu_check: FAILED — CUDA is not available" in proc.stderr
    result = json.loads((out / gc.RESULT_FILE).read_text())
    gc.validate_result(result)
    assert result["status"] == "fail" and result["reason"].startswith("CUDA is not available")
    assert result["cuda"]["available"] is False and result["cuda"]["torch"] == torch.__version__
    assert result["sections"] and all(s["status"] == "skip" and s["reason"] == "CUDA is not available"
                                      for s in result["sections"].values())
    assert "**Result: FAIL** — CUDA is not available" in (out / gc.SUMMARY_FILE).read_text()
    return result


@needs_no_cuda
def test_shell_script_stops_at_once_without_cuda_and_installs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu-out"
    env = {**os.environ, "PYTHON": sys.executable}
    # The timeout only stops a hung script; the script itself must fail at its first step.
    proc = subprocess.run(["bash", str(SHELL), str(out)], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)
    result = _check_no_cuda_result(out, proc)
    assert set(result["sections"]) == set(gc.SECTIONS)
    assert not (out / "install-status.txt").exists()  # it stopped before installing anything
    assert not (out / "work").exists()


@needs_no_cuda
def test_python_entry_writes_into_OUT_by_default(tmp_path: Path) -> None:
    out = tmp_path / "from-env"
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sections", "env,peers"], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)
    result = _check_no_cuda_result(out, proc)
    assert list(result["sections"]) == ["env", "peers"]


def test_shell_script_help_and_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(SHELL)], capture_output=True, timeout=30).returncode == 0
    proc = subprocess.run(["bash", str(SHELL), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "One-command GPU check" in proc.stdout
