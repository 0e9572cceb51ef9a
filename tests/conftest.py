"""Shared test setup and fixtures.

`pytest tests/` is a CPU suite on every machine (what CI runs): a visible GPU is hidden unless
RSMIM_TEST_GPU=1, which `.ci/gpu` sets to run the kernel tests on the compiled kernels
(`RSMIM_TEST_GPU=1 pytest tests/test_hog.py tests/test_attention.py`). Without a GPU the Triton
kernels run through Triton's interpreter: TRITON_INTERPRET must be set before triton is first
imported, so it is set here, at collection time, before any test module imports `kernels`.
"""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("RSMIM_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""   # before torch looks for devices

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The scripts cache decoded datasets in ~/.cache/rsmim by default (--cache auto): the tests, and the
# scripts they start, use a folder of their own that goes with the session.
_CACHE = tempfile.TemporaryDirectory(prefix="rsmim-test-cache-")
os.environ["RSMIM_CACHE"] = _CACHE.name

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
    # Script runs are CPU tests even under RSMIM_TEST_GPU=1: two torchrun ranks would both take NCCL
    # on one GPU, and the exact-resume checks would meet GPU nondeterminism.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
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


@pytest.fixture
def triton_attention(monkeypatch):
    """The scripts' `--attn triton` through the Triton kernel itself - the interpreter on the CPU, the
    compiled kernel on a GPU - instead of the torch path that backend='auto' takes for CPU tensors.
    Returns the device the test should put its model and inputs on."""
    import kernels.attention as ka
    kernel = ka.masked_attention
    monkeypatch.setattr(ka, "masked_attention",
                        lambda q, k, v, key_mask=None, scale=None: kernel(q, k, v, key_mask, scale, backend="triton"))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def assert_models_agree():
    """check(model_a, model_b, run): run(model) -> tuple of output tensors. With model_a's weights
    loaded into model_b, the outputs and the gradient of every parameter (under a fixed random
    weighting of the outputs) must agree."""
    return _assert_models_agree


def _assert_models_agree(model_a, model_b, run, atol=1e-4):
    model_b.load_state_dict(model_a.state_dict())
    grads = []
    for model in (model_a, model_b):
        torch.manual_seed(1)   # the same random selection (SelectiveMAE) and output weights in both runs
        outs = run(model)
        loss = sum((o.float() * torch.randn(o.shape, device=o.device)).sum() for o in outs)
        loss.backward()
        grads.append(([o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (outs_a, ga), (outs_b, gb) = grads
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=atol, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Scripts run in-process install data.SavePoints' SIGTERM/SIGUSR1 handlers: every test
    leaves the handlers as it found them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
