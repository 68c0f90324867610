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
    build = results["cache_build"]
    assert build["measured_targets"] == 4 * (1 + 2)  # one timed update per phase at batch 1 and at batch 2
    assert build["targets_per_s"] > 0 and 1 <= build["mean_evaluations_per_target"] <= 4
    projection = results["projection_1_gpu"]
    assert projection["student_updates"] == 10_000 and projection["cached_gpu_hours_with_build"] > projection["cache_build_gpu_hours"]
