"""Probe for the two-node test of selective_mae.py (tests/test_selective_mae.py starts it on two
torchrun "nodes"): runs the script's main() with the given flags, then prints this rank's
checksum of the trained parameters, so the test can check that both ranks hold the same model."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selective_mae  # noqa: E402  (the repo root on the path first)

trained = {}
train = selective_mae.train


def keep_model(*args):
    trained["model"], finished = train(*args)
    return trained["model"], finished


if __name__ == "__main__":
    selective_mae.train = keep_model
    selective_mae.main(sys.argv[1:])
    checksum = sum(p.double().sum().item() for p in trained["model"].parameters())
    print(f"rank {os.environ['RANK']} checksum {checksum:.12e}", flush=True)
