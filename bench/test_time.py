"""How long the test lanes and the demo take on this machine, as a newcomer and CI run them; writes
bench/results/test_time.json (the README's numbers).

    python -P bench/test_time.py fresh            # clone HEAD into a new folder, `make test` there: record `fresh_clone`
    python -P bench/test_time.py fresh --cpus 0   # the same pinned to one core (taskset): adds to `fresh_clone_one_core`
    python -P bench/test_time.py demo             # clone HEAD, `make demo` twice there (first, later): record `demo`
    python -P bench/test_time.py fast [--repeats 3]   # `make test-fast` here, after setup, N times: record `test_fast`
    python -P bench/test_time.py fresh --log LOG --wall-s S --commit C   # record a `make test` already run

A clone gets its own venv, both ComfyUI versions and an empty .cache, so it pays for everything a fresh machine
pays for. The `fresh_clone` record splits the wall time into setup (everything before the first pytest line) and
the two pytest runs (ComfyUI 0.30.0, then the floor 0.3.75), whose own summary lines give their seconds and counts;
the newest lane's summary (run in the background, printed last) is recorded beside them, and the seconds from the
main lane's start to each `== HH:MM:SS` stamp `make test` prints (the floor's start, the wait for the newest lane).
"""

from __future__ import annotations

import argparse
import json
import os
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


STAMP = re.compile(r"^== (?P<time>\d\d:\d\d:\d\d) (?P<what>.*)")


def lane_stamps(log: str) -> dict[str, int]:
    """Seconds from the first `== HH:MM:SS ...` line of `make test` (the main lane's start) to each later one: the
    floor's start, the wait for the newest lane, the end (the newest lane's own lines are printed last)."""
    stamps = [(m["time"], m["what"].split(":")[0].split(" (")[0]) for m in map(STAMP.match, log.splitlines()) if m]
    if not stamps:
        return {}

    def seconds(clock: str) -> int:
        h, m, s = (int(part) for part in clock.split(":"))
        return h * 3600 + m * 60 + s

    start = seconds(stamps[0][0])
    return {what: (seconds(clock) - start) % 86400 for clock, what in stamps}


def record(log: str, wall_s: float, commit: str, how: str) -> dict:
    runs = pytest_runs(log)
    if len(runs) not in (2, 3):
        raise SystemExit(f"expected two or three pytest summaries (ComfyUI 0.30.0, then 0.3.75, then the newest lane), "
                         f"found {len(runs)}")
    newest = runs[2:]  # `make test`'s newest lane ran in the background: its seconds overlap the two runs before it
    runs = runs[:2]
    pytest_s = sum(run["pytest_s"] for run in runs)
    made = {
        "note": "a fresh clone as CI runs it: make setup installs both ComfyUI versions (setup_and_startup_s); no test "
                "trains the digits teacher (the pack ships it)",
        "command": how,
        "commit": commit,
        "date": date.today().isoformat(),
        "setup_and_startup_s": round(wall_s - pytest_s, 1),
        "comfyui_0.30.0_whole_suite": runs[0],
        "comfyui_0.3.75_nodes_and_e2e": {**runs[1], "deselected_file": "tests/e2e/test_demo.py"},
        "pytest_total_s": round(pytest_s, 1),
        "total_wall_s": round(wall_s, 1),
        "passed": all(not run.get("failed") and not run.get("error") and not run.get("errors") for run in runs + newest),
    }
    stamps = lane_stamps(log)
    if stamps:
        made["seconds_from_the_main_lane_start"] = stamps
    if newest:
        made["newest_lane_in_the_background"] = newest[0]
        made["note"] += ("; the newest lane (.venv-newest) is built and run in the background, so setup_and_startup_s "
                         "also holds any wait for it after the floor run")
    return made


def clone_head() -> tuple[str, Path]:
    """(commit, path) of a new clone of HEAD in a temporary folder (no dot in the clone's own name)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    clone = Path(tempfile.mkdtemp(prefix="flash-test-time-")) / "main"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    return commit, clone


def timed(command: list[str], cwd: Path, log_name: str) -> tuple[int, float, str]:
    """(exit code, wall seconds, output) of `command`; the output is also kept beside the folder it ran in."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    wall_s, log = time.monotonic() - started, done.stdout + done.stderr
    kept = (cwd / ".cache" if cwd == REPO_ROOT else cwd.parent) / log_name  # never beside the checkout itself
    write_text_atomic(kept, log)
    print(f"{' '.join(command)}: exit {done.returncode}, {wall_s:.0f} s; its output: {kept}")
    return done.returncode, wall_s, log


def record_fast(repeats: int) -> dict:
    """`make test-fast` in this checkout (setup done first, not timed), `repeats` times: each wall time, the median."""
    subprocess.run(["make", "setup"], cwd=REPO_ROOT, check=True, capture_output=True)
    runs = []
    for _ in range(repeats):
        code, wall_s, log = timed(["make", "test-fast"], REPO_ROOT, "test-fast.log")
        summary = pytest_runs(log)
        runs.append({"wall_s": round(wall_s, 1), "exit": code, **(summary[-1] if summary else {})})
    walls = sorted(run["wall_s"] for run in runs)
    return {"command": "make test-fast (after make setup)", "date": date.today().isoformat(),
            "cpu_cores": os.cpu_count(), "runs": runs, "median_wall_s": walls[len(walls) // 2],
            "passed": all(run["exit"] == 0 for run in runs)}


def record_demo() -> dict:
    """`make demo` twice in a fresh clone: the first run pays for setup (venv, ComfyUI, Chromium), installing the
    shipped teacher and the distillation; the later one finds all of it in place."""
    commit, clone = clone_head()
    first_code, first_s, _ = timed(["make", "demo"], clone, "make_demo_first.log")
    later_code, later_s, _ = timed(["make", "demo"], clone, "make_demo_later.log")
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    return {"command": "git clone, then make demo twice in the clone", "commit": commit,
            "date": date.today().isoformat(), "cpu_cores": os.cpu_count(),
            "first_run_with_setup_s": round(first_s, 1), "later_run_s": round(later_s, 1),
            "git_status_after": dirty.splitlines(), "passed": first_code == 0 and later_code == 0 and not dirty}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", choices=("fresh", "demo", "fast"), default="fresh",
                        help="fresh: make test on a fresh clone; demo: make demo twice on a fresh clone; "
                             "fast: make test-fast here")
    parser.add_argument("--repeats", type=int, default=3, help="with fast: how many runs (the median is recorded)")
    parser.add_argument("--cpus", help="with fresh: run pinned to these CPUs (taskset -c), e.g. 0 for one core; "
                                       "the record is appended to fresh_clone_one_core")
    parser.add_argument("--log", type=Path, help="fresh: the output of a `make test` already run on a fresh clone")
    parser.add_argument("--wall-s", type=float, help="with --log: that run's wall time in seconds")
    parser.add_argument("--commit", help="with --log: the commit it ran")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (the record made is replaced)")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.what == "fast":
        results["test_fast"] = made = record_fast(args.repeats)
    elif args.what == "demo":
        results["demo"] = made = record_demo()
    else:
        if args.log is not None:
            if args.wall_s is None or args.commit is None:
                parser.error("--log needs --wall-s and --commit")
            log, wall_s, commit = args.log.read_text(errors="replace"), args.wall_s, args.commit
            how = "git clone, then make test in the clone (its output recorded with bench/test_time.py --log)"
        else:
            commit, clone = clone_head()
            pinned = ["taskset", "-c", args.cpus] if args.cpus else []
            _, wall_s, log = timed([*pinned, "make", "test"], clone, "make_test.log")
            how = f"python -P bench/test_time.py fresh{' --cpus ' + args.cpus if args.cpus else ''} (git clone of " \
                  f"HEAD, then {' '.join(pinned + ['make', 'test'])} in the clone)"
        made = record(log, wall_s, commit, how)
        if args.cpus:
            made["cpus"] = args.cpus
            results["fresh_clone_one_core"] = [*results.get("fresh_clone_one_core", []), made]
        else:
            before = results.get("fresh_clone")
            if before and before.get("commit") != commit:  # the record it replaces, for the side-by-side
                made["previous"] = {k: before.get(k) for k in ("commit", "date", "total_wall_s", "note")}
            results["fresh_clone"] = made
    write_json_atomic(args.out, results)
    print(json.dumps(made, indent=2))
    return 0 if made["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
