"""cmid.py under torchrun, printing after training a float64 checksum of the student's and the teacher's parameters
on every rank (tests/test_cmid.py starts it as two single-process "nodes"; nothing of it is in the script)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmid  # noqa: E402
import data  # noqa: E402

train = cmid.train


def train_and_print(args, device, rank, world):
    models = train(args, device, rank, world)
    total = sum(p.double().sum().item() for m in models for p in m.parameters())
    print(f"rank {rank} of {world} checksum {total:.12e}", flush=True)
    return models


cmid.train = train_and_print
data.run_main(cmid.main)
