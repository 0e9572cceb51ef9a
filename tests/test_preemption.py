"""A cluster's preemption notice, as a scheduler sends it: SIGTERM to the running script (a real
subprocess) mid-epoch -> it checkpoints at the next step boundary and exits 0 -> `--resume auto`
continues -> the per-step losses are those of an uninterrupted run, for each script."""
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO

COMMON = ["--data", "synthetic", "--synthetic-images", "40", "--batch-size", "8", "--epochs", "4",
          "--workers", "0", "--log-every", "1", "--no-eval", "--eval-every", "0", "--cache", "none"]
TINY = {"selective_mae.py": ["--arch", "vit_tiny", "--img-size", "64", "--patch-size", "8", "--depth", "2",
                             "--decoder-depth", "1"],
        "gsc_mim.py": ["--arch", "vit_tiny", "--img-size", "32", "--patch-size", "16", "--out-dim", "64",
                       "--head-hidden", "64", "--warmup-epochs", "1"],
        "cmid.py": ["--arch", "vit_tiny", "--depth", "2", "--img-size", "32", "--patch-size", "16",
                    "--mask-patch-size", "16", "--proj-hidden", "32", "--proj-dim", "16", "--local-hidden", "32",
                    "--local-bottleneck", "16", "--local-out", "32", "--queue-size", "100", "--local-pairs", "3"]}
STEP = re.compile(r"epoch (\d+)(?:/\d+)? step (\d+)/\d+ loss (\S+)")   # the three scripts' log lines


def start(script, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / script), *COMMON, *TINY[script], "--out", str(out),
                             "--resume", "auto"], cwd=out.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def step_losses(text):
    return {(int(e), int(s)): loss for e, s, loss in STEP.findall(text)}


@pytest.mark.parametrize("script", list(TINY))
def test_sigterm_mid_epoch_checkpoints_and_resume_is_exact(script, tmp_path):
    whole = start(script, tmp_path / "whole").communicate(timeout=600)[0]
    reference = step_losses(whole)
    assert len(reference) >= 4, whole[-3000:]                  # 4 epochs of a 30-image train split

    proc, seen = start(script, tmp_path / "cut"), []
    for line in proc.stdout:                                   # the notice arrives early in the run
        seen.append(line)
        if len(STEP.findall("".join(seen))) == 2:
            proc.send_signal(signal.SIGTERM)
            break
    first = "".join(seen) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "preempted (SIGTERM)" in first and "--resume auto" in first, first[-3000:]
    done = step_losses(first)
    assert 2 <= len(done) < len(reference), first[-3000:]      # stopped mid-run, at a step boundary

    second = start(script, tmp_path / "cut").communicate(timeout=600)[0]
    resumed = step_losses(second)
    assert not set(done) & set(resumed), second[-3000:]         # no step trained twice
    assert {**done, **resumed} == reference
