"""bench/test_time.py: the fresh-clone test-time record is read from `make test`'s own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

LOG = """\
/tmp/x/.venv/bin/python -P -m pytest tests -q -p no:cacheprovider --durations=15
........................................................................ [ 12%]
============================= slowest 15 durations =============================
130.63s setup    tests/nodes/test_training.py::test_distillation_brings_2_step_student_closer
557 passed, 237 warnings in 1276.80s (0:21:16)
== node and end-to-end suites on ComfyUI 0.3.75 (/tmp/x/.comfyui-0.3.75)
1 failed, 216 passed, 4 skipped, 6 deselected, 121 warnings in 394.94s (0:06:34)
"""


def record_log(tmp_path: Path, log: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`bench/test_time.py fresh --log` on `log` (wall 1900 s, commit abc): (the run, the results file it wrote)."""
    (tmp_path / "make_test.log").write_text(log)
    out = tmp_path / "test_time.json"
    command = [sys.executable, "-P", str(REPO_ROOT / "bench" / "test_time.py"), "--log", str(tmp_path / "make_test.log"),
               "--wall-s", "1900", "--commit", "abc", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False), out


def test_the_record_splits_setup_and_the_two_suites_and_says_whether_they_passed(tmp_path):
    (tmp_path / "test_time.json").write_text(json.dumps({"cached_models": {"total_wall_s": 1}}))
    result, out = record_log(tmp_path, LOG)
    assert result.returncode == 1, result.stdout + result.stderr  # the floor run had a failure
    written = json.loads(out.read_text())
    fresh = written["fresh_clone"]
    assert written["cached_models"] == {"total_wall_s": 1}  # the other records stay
    assert fresh["comfyui_0.30.0_whole_suite"] == {"pytest_s": 1276.8, "passed": 557, "warnings": 237}
    assert fresh["comfyui_0.3.75_nodes_and_e2e"]["failed"] == 1 and fresh["comfyui_0.3.75_nodes_and_e2e"]["skipped"] == 4
    assert fresh["pytest_total_s"] == 1671.7 and fresh["setup_and_startup_s"] == 228.3 and fresh["commit"] == "abc"
    assert fresh["passed"] is False and "previous" not in fresh  # nothing to compare with


def test_the_newest_lane_printed_last_is_recorded_beside_the_two_suites(tmp_path):
    """`make test` runs the newest lane in the background and prints its output last: a third summary line."""
    log = LOG.replace("1 failed, 216 passed", "216 passed") + (
        "== newest lane on ComfyUI 0.30.0, .venv-newest: torch 2.14.1, transformers 5.25.0, peft 0.21.2, ...\n"
        "503 passed, 1 deselected, 246 warnings in 168.37s (0:02:48)\n")
    result, out = record_log(tmp_path, log)
    assert result.returncode == 0, result.stdout + result.stderr
    fresh = json.loads(out.read_text())["fresh_clone"]
    assert fresh["newest_lane_in_the_background"] == {"pytest_s": 168.37, "passed": 503, "deselected": 1,
                                                      "warnings": 246}
    assert fresh["pytest_total_s"] == 1671.7 and fresh["passed"] is True


def test_the_lane_stamps_give_each_lane_its_start_and_the_wait_for_the_newest_lane(tmp_path):
    """`make test` stamps each lane's first line (== HH:MM:SS ...); the record keeps the seconds from the main lane's."""
    log = (LOG.replace("1 failed, 216 passed", "216 passed")
           .replace("== node and end-to-end", "== 23:59:30 node and end-to-end")
           .replace("/tmp/x/.venv/bin/python -P -m pytest tests",
                    "== 23:38:14 whole suite on ComfyUI 0.30.0, .venv: torch 2.14.1\n/tmp/x/.venv/bin/python -P -m pytest tests"))
    log += ("== 00:06:05 waiting for the newest lane\n== 23:38:14 newest lane starts (building .venv-newest)\n"
            "== 23:40:20 newest lane on ComfyUI 0.30.0, .venv-newest: torch 2.14.1\n"
            "503 passed, 246 warnings in 168.37s (0:02:48)\n== 00:06:06 done\n")
    result, out = record_log(tmp_path, log)
    assert result.returncode == 0, result.stdout + result.stderr
    stamps = json.loads(out.read_text())["fresh_clone"]["seconds_from_the_main_lane_start"]
    assert stamps == {"whole suite on ComfyUI 0.30.0, .venv": 0, "node and end-to-end suites on ComfyUI 0.3.75": 1276,
                      "waiting for the newest lane": 1671, "newest lane starts": 0,
                      "newest lane on ComfyUI 0.30.0, .venv-newest": 126, "done": 1672}
