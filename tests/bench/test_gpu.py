"""bench/gpu.py --smoke: the GPU benchmark's whole path (live and cached updates, the target solve, the
throughput and the projection) on the CPU with a tiny UNet, so the script the GPU run needs is known to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the benchmark script end to end in a subprocess: make test, not test-fast
def test_gpu_benchmark_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-P", str(REPO_ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] and set(results["runs"]) == {"1", "2"}
    for row in results["runs"].values():
        for kind in ("live", "cached"):
            phases = row[kind]["phases"]
            assert set(phases) == {"1", "2", "3", "4"} and all(p["update_s"] > 0 for p in phases.values())
        assert all(p["teacher_s"] > 0 for p in row["live"]["phases"].values())
    for row in results["runs"].values():  # the live teacher part by expectation over each phase's mixture
        for phase in row["live"]["phases"].values():
            assert phase["teacher_s"] == pytest.approx(phase["seconds_per_teacher_evaluation"] * phase["expected_teacher_evaluations"])
            assert 1 <= phase["expected_teacher_evaluations"] <= 4  # K = 4 in the smoke run
    build = results["cache_build"]
    assert build["measured_targets"] == 4 * 2 * (1 + 2)  # both runs' whole short run: 2 updates per phase, batch 1 and 2
    projection = results["projection"]
    assert projection["paper"]["student_samples"] == 80_000 and projection["targets_per_s"] > 0
    for size, row in projection["one_gpu"].items():
        assert row["student_updates"] * int(size) == 80_000  # the paper's work: the same student samples
        assert row["cached_gpu_hours_with_build"] > projection["cache_build_gpu_hours"] > 0


def test_reproject_recomputes_the_projection_of_the_committed_gpu_results_at_the_papers_work(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "-P", str(REPO_ROOT / "bench" / "gpu.py"), "--reproject", "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    committed = json.loads((REPO_ROOT / "bench" / "results" / "gpu.json").read_text())
    assert results["runs"].keys() == committed["runs"].keys() and results["device"] == committed["device"]
    assert results["projection"]["one_gpu"]["4"]["student_updates"] == 20_000  # 2 GPUs x batch 4 x 10k on one GPU
    assert "reprojected" in results["projection"] or committed.get("update_order") == "both optimisers on every batch"
