"""Probe for tests/test_gsc_mim.py's two-node test: `torchrun ... tests/gsc_ddp_probe.py <gsc_mim.py flags>`
trains with gsc_mim.py's own functions, then prints one line per rank with a checksum of the student's
parameters (the test compares the ranks). The script itself carries no debug flag for this."""
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gsc_mim  # noqa: E402

args = gsc_mim.resolve_defaults(gsc_mim.get_args_parser().parse_args(sys.argv[1:]))
gsc_mim.setup_distributed(args)
run = gsc_mim.train(args)
checksum = sum(float(p.double().sum()) for p in run.student.parameters())
print(f"rank {args.rank} of {args.world_size} checksum {checksum:.12e}", flush=True)
dist.destroy_process_group()
