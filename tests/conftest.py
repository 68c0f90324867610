"""Shared test plumbing: importing ComfyUI in-process and loading this pack as a package.

Unit tests may import ComfyUI modules directly (`comfy_path` fixture, or `import_comfy()` before any
`import comfy...`); end-to-end tests start a real server (tests/e2e/conftest.py). flash_core and training
come from the editable install (`make setup`); the repository root itself is never put on sys.path,
because our `nodes/` package would shadow ComfyUI's top-level `nodes` module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.fixtures.comfy_env import import_comfy, load_pack  # noqa: F401  (re-exported for tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_flash"
E2E_DIR = REPO_ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every end-to-end test (a real server, the browser, the demo) is `slow`: `make test-fast` leaves them to
    `make test`. Other heavy tests (full-size bf16 steps, several processes, long trainings) carry the mark
    themselves."""
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    """Under pytest-xdist (`make test` / `make test-fast` run two workers on two cores, beside the newest lane's two)
    each worker gets one torch thread, and so does every process a test starts (ComfyUI servers, the demo, comfy-cli,
    the CLI), through OMP_NUM_THREADS unless it is set: a process with a thread per core beside the others
    oversubscribes the machine, and OpenMP threads that wait for a busy core slow a run ten times over (the demo's
    dataset step: 6 s alone, over 100 s beside two busy workers)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    return import_comfy()


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    run fastest on one thread, and far faster on a loaded 2-core machine, where more threads oversubscribe."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
