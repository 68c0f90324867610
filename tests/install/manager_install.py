"""Install the pack's requirements.txt into the running Python the way ComfyUI-Manager, `comfy node install` and
the README's git-clone path do (`python -m pip install -r requirements.txt`), and record what that changed.

`make newest` runs it in .venv-newest/ right after ComfyUI's own requirements.txt (nothing else installed yet:
no test tools, no training extras), so the record holds a user's ComfyUI environment before and after installing
the pack. tests/install/test_install.py asserts on it: nothing that was installed is upgraded, downgraded or
reinstalled, torch above all.

    python -P tests/install/manager_install.py RECORD.json [REQUIREMENTS.txt]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# a fresh interpreter reads the site-packages pip has just changed
LIST = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"


def installed() -> dict[str, str]:
    """pip name (normalised) -> version of every distribution this Python sees."""
    out = subprocess.run([sys.executable, "-c", LIST], check=True, capture_output=True, text=True).stdout
    return {name.lower().replace("_", "-").replace(".", "-"): version for name, version in json.loads(out).items()}


def main(argv: list[str]) -> int:
    record_path = Path(argv[0])
    requirements = Path(argv[1]) if len(argv) > 1 else REPO_ROOT / "requirements.txt"
    before = installed()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--report", str(report_path), "-r", str(requirements)]
        result = subprocess.run(command, capture_output=True, text=True)
        report = json.loads(report_path.read_text()) if report_path.is_file() else {"install": []}
    after = installed()
    record = {
        "command": "python -m pip install -r requirements.txt",
        "requirements": requirements.read_text(),
        "returncode": result.returncode,
        "pip_output": result.stdout[-20000:] + result.stderr[-20000:],
        # what pip installed, reinstalls included (a package replaced at the same version shows here only)
        "installed_by_pip": {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]},
        "before": before,
        "after": after,
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    added = sorted(set(after) - set(before))
    print(f"pip install -r {requirements.name}: exit {result.returncode}; added {', '.join(f'{n} {after[n]}' for n in added)}")
    return result.returncode  # the record is written either way


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
