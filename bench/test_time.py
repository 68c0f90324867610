"""How long `make test` takes on a fresh clone, as CI runs it; writes the `fresh_clone` record of
bench/results/test_time.json.

    python -P bench/test_time.py                 # clone HEAD into a new folder, run `make test` there, record it
    python -P bench/test_time.py --log LOG --wall-s S --commit C   # record a run already made (its output in LOG)

The clone gets its own venv, both ComfyUI versions and an empty .cache, so the run pays for everything a fresh
machine pays for: setup, and the end-to-end digits teacher. The record splits the wall time into setup (everything
before the first pytest line) and the two pytest runs, whose own summary lines give their seconds and counts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from flash_core.files import write_json_atomic, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "test_time.json"
SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[0-9.]+)s")


def pytest_runs(log: str) -> list[dict]:
    """One record per pytest summary line of `log`: its counts (passed, failed, skipped, ...) and seconds."""
    runs = []
    for line in log.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", match["counts"])}
            runs.append({"pytest_s": float(match["seconds"]), **counts})
    return runs


def record(log: str, wall_s: float, commit: str, how: str) -> dict:
    runs = pytest_runs(log)
    if len(runs) != 2:
        raise SystemExit(f"expected two pytest summaries (ComfyUI 0.30.0, then 0.3.75), found {len(runs)}")
    pytest_s = sum(run["pytest_s"] for run in runs)
    return {
        "note": "a fresh clone as CI runs it: make setup installs both ComfyUI versions; the digits teacher of the "
                "end-to-end tests is trained by a background process while the other tests run (they run first)",
        "command": how,
        "commit": commit,
        "date": date.today().isoformat(),
        "setup_and_startup_s": round(wall_s - pytest_s, 1),
        "comfyui_0.30.0_whole_suite": runs[0],
        "comfyui_0.3.75_nodes_and_e2e": {**runs[1], "deselected_file": "tests/e2e/test_demo.py"},
        "pytest_total_s": round(pytest_s, 1),
        "total_wall_s": round(wall_s, 1),
        "passed": all(not run.get("failed") and not run.get("error") and not run.get("errors") for run in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, help="the output of a `make test` already run on a fresh clone")
    parser.add_argument("--wall-s", type=float, help="with --log: that run's wall time in seconds")
    parser.add_argument("--commit", help="with --log: the commit it ran")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (its fresh_clone record is replaced)")
    args = parser.parse_args(argv)
    if args.log is not None:
        if args.wall_s is None or args.commit is None:
            parser.error("--log needs --wall-s and --commit")
        log, wall_s, commit = args.log.read_text(errors="replace"), args.wall_s, args.commit
        how = "git clone, then make test in the clone (its output recorded with bench/test_time.py --log)"
    else:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        clone = Path(tempfile.mkdtemp(prefix="flash-test-time-")) / "main"  # no dot in the clone's own name
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        started = time.monotonic()
        done = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True, check=False)
        wall_s, log = time.monotonic() - started, done.stdout + done.stderr
        how = "python -P bench/test_time.py (git clone of HEAD, then make test in the clone)"
        write_text_atomic(clone.parent / "make_test.log", log)
        print(f"make test: exit {done.returncode}, {wall_s:.0f} s; its output: {clone.parent / 'make_test.log'}")
    fresh = record(log, wall_s, commit, how)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    before = results.get("fresh_clone")
    if before and before.get("commit") != commit:  # the record it replaces, for the side-by-side
        fresh["previous"] = {k: before.get(k) for k in ("commit", "date", "total_wall_s", "note")}
    results["fresh_clone"] = fresh
    write_json_atomic(args.out, results)
    print(json.dumps(fresh, indent=2))
    return 0 if fresh["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
