"""Shared test setup and fixtures.

Without a GPU the Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time, before any test module
imports `kernels`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tests are sized for 2 CPU cores; more threads only fight each other there.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The real UC Merced sample beside the checkout (never committed): ../shared/data/UCMerced_LandUse.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def ucm_root():
    """Root folder holding UCMerced_LandUse/Images/<class>/...; skips the test where it is absent."""
    if not (SHARED_DATA / "UCMerced_LandUse" / "Images").is_dir():
        pytest.skip("../shared/data/UCMerced_LandUse is not present on this machine")
    return SHARED_DATA


def _run(cmd, cwd, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def run_script(tmp_path):
    """Run `python SCRIPT ARGS...` from the repo root (one process); returns the CompletedProcess.

    Fails the test with the script's output when it exits non-zero."""
    def run(script, *args, timeout=300):
        return _run([sys.executable, str(REPO / script), *map(str, args)], REPO, timeout)
    return run


@pytest.fixture
def run_torchrun():
    """Run `torchrun --nproc_per_node=N SCRIPT ARGS...` on the CPU (gloo)."""
    def run(nproc, script, *args, timeout=300):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(REPO / script), *map(str, args)]
        return _run(cmd, REPO, timeout)
    return run
