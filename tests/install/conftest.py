"""tests/install runs in .venv-newest/ only (`make test-newest`, the newest lane of `make test`): it reads the record
`make newest` writes there (manager-install.json). In any other Python nothing here is collected, so `make test`'s
and `make test-fast`'s runs in .venv/ leave it alone."""

from __future__ import annotations

import sys
from pathlib import Path

RECORD = Path(sys.prefix) / "manager-install.json"

collect_ignore = [] if RECORD.is_file() else ["test_install.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "install_check: the install check of .venv-newest (make test-newest)")
