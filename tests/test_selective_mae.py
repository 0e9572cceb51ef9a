"""Tests of selective_mae.py: token selection (unit, in-process) and the script's conventions
(smoke runs of main() in-process: resume, export, eval-only, visualize, plain-MAE mode, adaptive
budget; torchrun as a subprocess)."""
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("selective_mae", REPO / "selective_mae.py")
smae = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smae)

# Tiny and fast: ViT-Tiny width with 2 blocks, 64 px / patch 8 (N = 64, K = 9, R = 16), 1-block decoder.
TINY = ["--img-size", "64", "--patch-size", "8", "--depth", "2", "--decoder-depth", "1",
        "--synthetic-images", "40", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--cache", "none"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP with 2 threads spins and runs ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_args(*flags):
    return smae.resolve_args(smae.get_args_parser().parse_args([*TINY, *flags]))


def planted_images(B=6, size=64, patch=8, seed=0):
    """Flat images, each with one textured (random-noise) patch at a random grid position."""
    g = torch.Generator().manual_seed(seed)
    grid = size // patch
    images = torch.full((B, 3, size, size), 0.3)
    where = torch.randint(0, grid * grid, (B,), generator=g)
    for b in range(B):
        r, c = divmod(int(where[b]), grid)
        images[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = torch.rand(3, patch, patch, generator=g)
    return images, where


def test_token_counts_disjoint_and_targets_among_masked():
    torch.manual_seed(0)
    for flags in ([], ["--seed-select", "sample", "--target-select", "sample"], ["--target-select", "random"],
                  ["--adaptive-budget"], ["--mask-ratio", "0.75", "--recon-ratio", "0.75", "--seed-select", "random",
                                          "--target-select", "random", "--decoder", "self"]):
        args = make_args(*flags)
        model = smae.SelectiveMAE(args)
        N, K, R = model.num_patches, model.n_keep, model.n_targets
        tokens, scores = torch.randn(5, N, 16), torch.rand(5, N)
        for probs in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0]):
            vis, tgt, valid = model.choose_tokens(tokens, scores, torch.tensor(probs))
            assert tgt.shape == (5, R) and (N, K, R) == (64, 16 if "0.75" in flags else 9, 48 if "0.75" in flags else 16)
            if valid is None:
                assert vis.shape == (5, K)
                valid = torch.ones_like(vis, dtype=torch.bool)
            else:                     # adaptive: padded to n_pad, a variable number valid per image
                assert vis.shape == (5, model.n_pad) and valid.any(1).all()
            for b in range(5):
                v = set(vis[b][valid[b]].tolist())
                assert len(set(vis[b].tolist())) == vis.shape[1]         # no index twice
                t = set(tgt[b].tolist())
                assert len(t) == R and not (v & t)                      # disjoint: targets only among masked
        if "0.75" in flags:           # plain MAE: every masked patch is reconstructed
            assert K + R == N


def test_topk_seeds_pick_the_planted_textured_patch():
    images, where = planted_images()
    scores = smae.hog_patch_scores(images, 8)
    assert (scores.argmax(1) == where).all()
    model = smae.SelectiveMAE(make_args())
    tokens = model.encoder.input_tokens(images).detach()
    vis = smae.psts_select(tokens, scores, model.n_keep, 2, "topk", 1.0, torch.tensor([1.0, 0, 0]))
    n_seed = model.n_keep // 2
    for b in range(len(images)):
        assert int(where[b]) in vis[b, :n_seed].tolist()
        assert set(vis[b, :n_seed].tolist()) == set(scores[b].topk(n_seed).indices.tolist())
    # the planted patch is also never a reconstruction target (it is visible)
    tgt = smae.select_targets(scores, vis, None, model.n_targets, "topk", 1.0)
    assert not (tgt == where[:, None]).any()


def test_curriculum_stage_at_progress():
    expect = {0.0: ("near", (1, 0, 0)), 0.2: ("near", (1, 0, 0)), 0.3625: ("blend", (0.5, 0.5, 0)),
              0.375: ("far", (0, 1, 0)), 0.6: ("far", (0, 1, 0)), 0.7375: ("blend", (0, 0.5, 0.5)),
              0.75: ("random", (0, 0, 1)), 0.99: ("random", (0, 0, 1))}
    for p, (name, probs) in expect.items():
        got_name, got = smae.psts_stage(p)
        assert got_name == name and torch.allclose(torch.tensor(got), torch.tensor(probs, dtype=torch.float32)), p
    # the per-step schedule scales with --epochs: 800 epochs -> near until 280, far from 300 to 580
    sched = smae.stage_schedule(800, 1, "cpu")
    assert sched[279].tolist() == [1, 0, 0] and sched[300].tolist() == [0, 1, 0]
    assert sched[579].tolist() == [0, 1, 0] and sched[600].tolist() == [0, 0, 1]


def test_near_round_picks_are_more_similar_than_far_round_picks():
    torch.manual_seed(0)
    B, N, n_keep = 8, 64, 16
    centres = torch.randn(4, 32)
    tokens = centres[torch.randint(0, 4, (B, N))] + 0.5 * torch.randn(B, N, 32)   # clustered tokens
    scores = torch.rand(B, N)
    unit = torch.nn.functional.normalize(tokens, dim=-1)

    def similarity_to_seeds(probs):
        vis = smae.psts_select(tokens, scores, n_keep, 2, "topk", 1.0, torch.tensor(probs))
        seeds, added = vis[:, :n_keep // 2], vis[:, n_keep // 2:]
        sim = smae.gather_tokens(unit, added) @ smae.gather_tokens(unit, seeds).transpose(1, 2)
        return sim.amax(-1).mean().item()
    near, far, rand = similarity_to_seeds([1.0, 0, 0]), similarity_to_seeds([0, 1.0, 0]), similarity_to_seeds([0, 0, 1.0])
    assert near > rand > far, (near, rand, far)


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    args = make_args("--img-size", "32")
    model = smae.SelectiveMAE(args)
    images, _ = planted_images(B=4, size=32)
    images = images + 0.2 * torch.linspace(0, 1, 32)[None, None, :, None]       # some structure to learn
    scores = smae.hog_patch_scores(images, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probs = torch.tensor([1.0, 0, 0])
    losses = []
    for _ in range(40):
        loss = model(images, scores, probs)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def run_main(capsys, *argv):
    """Run the script's main() in this process (no torch import per run); returns its stdout."""
    capsys.readouterr()
    smae.main([str(a) for a in argv])
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """A 2-block model trained for one epoch (3 steps) with --seed 3 into a non-default --out, with the
    final evaluation; then --export, --visualize and --eval-only on its checkpoint in one call (the
    script accepts the three together) with only the checkpoint path: they must write beside it and
    use its data (40 synthetic images, not the demo's 400). Returns (out folder, stdout of the
    modes, the training run's eval.json)."""
    out = tmp_path_factory.mktemp("smae") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # module scope: before the one_thread fixture
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", io.StringIO())
        smae.main([*TINY, "--epochs", "1", "--seed", "3", "--out", str(out)])
        trained = json.loads((out / "eval.json").read_text())
        sys.stdout = io.StringIO()
        ckpt = str(out / "checkpoint.pth")
        smae.main(["--export", ckpt, "--visualize", ckpt, "--eval-only", ckpt])
        torch.set_num_threads(threads)
        return out, sys.stdout.getvalue(), trained


def log_records(out, key):
    return [r for r in map(json.loads, open(Path(out) / "log.jsonl")) if key in r]


def step_losses(stdout):
    return re.findall(r"^epoch (\d+ step \d+)/\d+ loss (\S+)", stdout, re.M)


def test_exact_resume_from_a_signal_and_from_max_steps(tmp_path, capsys, monkeypatch):
    """Per-step losses of an uninterrupted run (checkpointing every step by the clock) = those of a
    run preempted by SIGUSR1 mid-epoch, resumed, stopped by --max-steps mid-epoch, resumed again.
    The log holds each epoch's loss and kNN (--eval-every 2: epoch 1 only) once, and the floor once."""
    common = [*TINY, "--epochs", "2", "--no-eval", "--eval-every", "2"]   # 32 train -> 3 steps/epoch
    a = run_main(capsys, *common, "--out", tmp_path / "a", "--save-every", "1e-9")
    assert len(re.findall(r"^checkpoint .* snapshot \d+ ms \(previous write \d+ ms", a, re.M)) == 6

    train_step = smae.train_step
    def preempt_at_step_2(*args, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)   # a scheduler's preemption notice, mid-step
        return train_step(*args)
    monkeypatch.setattr(smae, "train_step", preempt_at_step_2)
    b = run_main(capsys, *common, "--out", tmp_path / "b")
    assert "preempted (SIGUSR1)" in b and "at epoch 0 step 2; resume with the same command plus --resume auto" in b
    monkeypatch.setattr(smae, "train_step", train_step)
    b += run_main(capsys, *common, "--out", tmp_path / "b", "--resume", "auto", "--max-steps", "4")
    assert "resumed" in b and "epoch 0 step 2" in b and "--max-steps 4 reached" in b
    b += run_main(capsys, *common, "--out", tmp_path / "b", "--resume", "auto")
    assert len(step_losses(a)) == 6 and step_losses(a) == step_losses(b)
    for run in ("a", "b"):
        assert [r["epoch"] for r in log_records(tmp_path / run, "loss")] == [0, 1]
        assert [(r["epoch"], r["step"]) for r in log_records(tmp_path / run, "knn")] == [(1, 6)]
        assert len(log_records(tmp_path / run, "knn_floor")) == 1
    assert log_records(tmp_path / "a", "loss") != [] and \
        [r["loss"] for r in log_records(tmp_path / "a", "loss")] == [r["loss"] for r in log_records(tmp_path / "b", "loss")]
    from PIL import Image
    assert Image.open(tmp_path / "b" / "curves.png").format == "PNG"


def test_resume_loads_the_checkpoint_on_the_cpu(tmp_path, capsys, monkeypatch):
    """--resume on a GPU machine used to hand CUDA RNG states to torch.set_rng_state: every load of
    the resume path must map to the CPU, and set_rng_state must get CPU tensors."""
    run_main(capsys, *TINY, "--epochs", "1", "--max-steps", "1", "--eval-every", "0", "--out", tmp_path)
    loads, states = [], []
    real_load, real_set = torch.load, torch.set_rng_state
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k))
    monkeypatch.setattr(torch, "set_rng_state", lambda s: states.append(s.device) or real_set(s))
    out = run_main(capsys, *TINY, "--epochs", "1", "--max-steps", "2", "--eval-every", "0", "--out", tmp_path,
                   "--resume", "auto")
    assert "resumed" in out and loads and all(str(m) == "cpu" for m in loads), loads
    assert states and all(d.type == "cpu" for d in states)


def test_a_rank_the_checkpoint_lacks_keeps_its_own_seed(tmp_path, capsys, monkeypatch):
    """Resumed on more processes than were saved: rank 1 of a 1-rank checkpoint must not take rank
    0's RNG streams (both ranks would draw the same crops and selections); rank 0 takes its own."""
    run_main(capsys, *TINY, "--epochs", "1", "--max-steps", "1", "--eval-every", "0", "--out", tmp_path)
    args = smae.resolve_args(smae.get_args_parser().parse_args(
        [*TINY, "--epochs", "1", "--max-steps", "1", "--eval-every", "0", "--out", str(tmp_path), "--resume", "auto"]))
    args.load_size = args.img_size
    taken = []
    monkeypatch.setattr(smae, "set_rng_state", taken.append)
    for rank in (1, 0):
        smae.train(args, rank, 1, torch.device("cpu"))
    assert len(taken) == 1


def test_two_processes_evaluate_during_training_without_deadlock(run_torchrun, tmp_path):
    """2 gloo ranks, one epoch (4 steps each), kNN after it on rank 0 while rank 1 waits at a barrier."""
    proc = run_torchrun(2, "selective_mae.py", *TINY, "--epochs", "1", "--out", tmp_path, "--eval-every", "1",
                        "--synthetic-images", "80", "--no-eval", timeout=240)     # 64 train images: 4 steps per rank
    assert "world 2" in proc.stdout and "knn " in proc.stdout
    assert [r["epoch"] for r in log_records(tmp_path, "knn")] == [0] and (tmp_path / "checkpoint.pth").exists()


def test_two_nodes_train_checkpoint_and_resume(tmp_path):
    """Two torchrun "nodes" (c10d rendezvous on this host, gloo, 1 process each): 2 steps leave the
    same parameters on both ranks and one checkpoint; --resume auto continues on the same two nodes."""
    def launch(*extra):
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        endpoint, rdzv_id = f"127.0.0.1:{port.getsockname()[1]}", uuid.uuid4().hex
        port.close()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
               str(REPO / "tests" / "smae_ddp_probe.py"), *TINY, "--epochs", "1", "--synthetic-images", "80",
               "--eval-every", "0", "--no-eval", "--out", str(tmp_path), *extra]
        nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outputs = [node.communicate(timeout=120) for node in nodes]
        for node, (stdout, stderr) in zip(nodes, outputs):
            assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
        stdout = "".join(o for o, _ in outputs)
        checksums = dict(re.findall(r"^rank (\d) checksum (\S+)$", stdout, re.M))
        assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], stdout
        return stdout, checksums["0"]
    first, after_2 = launch("--max-steps", "2")
    assert "world 2" in first and "--max-steps 2 reached" in first and (tmp_path / "checkpoint.pth").exists()
    second, after_4 = launch("--resume", "auto")
    assert "resumed" in second and "epoch 0 step 2" in second and after_4 != after_2
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["run"]["epoch"] == 1


def test_export_keys_match_timm_vit_names(tools):
    assert "wrote " + str(tools[0] / "backbone.pth") in tools[1]
    keys = set(torch.load(tools[0] / "backbone.pth", map_location="cpu").keys())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert keys == expected


def test_eval_only_prints_the_three_protocols(tools):
    out = tools[1]
    for proto in ("linear@1%", "linear@100%", "knn"):
        assert any(line.startswith(proto) and len(line.split()) == 3 for line in out.splitlines()), out
    assert "random-init" in out and "evaluation on synthetic (30 train / 10 test" in out   # the checkpoint's data
    results = json.loads((tools[0] / "eval.json").read_text())
    assert set(results) == {"pretrained", "random-init"} and 0 <= results["pretrained"]["knn"] <= 100
    assert results == tools[2]           # the checkpoint's seed 3 (the floor) and split: the training run's table
    from PIL import Image
    assert Image.open(tools[0] / "curves.png").format == "PNG" and "curves.png from" in out


def test_eval_only_with_another_seed_keeps_the_split_and_the_numbers(tools, capsys, tmp_path):
    """--seed is not the split: --eval-only --seed 5 evaluates the checkpoint on the training run's test
    split (splits.json) with the same pretrained numbers."""
    run_main(capsys, "--eval-only", tools[0] / "checkpoint.pth", "--seed", "5", "--out", tmp_path)
    assert json.loads((tmp_path / "splits.json").read_text()) == json.loads((tools[0] / "splits.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["pretrained"] == tools[2]["pretrained"]


def test_visualize_writes_png(tools):
    from PIL import Image
    img = Image.open(tools[0] / "visualize.png")
    tile = img.size[0] // 3                               # columns: input | masks | reconstruction
    assert img.size[0] == 3 * tile and img.size[1] % tile == 0 and img.size[1] >= tile


def one_line_error(*argv, cwd=REPO):
    """Run the script in a subprocess: it must exit 2 with exactly one stderr line, `error: ...`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "selective_mae.py"), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_user_errors_are_one_line_and_exit_2(tools, tmp_path):
    assert "AID not found" in one_line_error("--data", "AID", "--data-root", tmp_path / "nowhere")
    assert "unknown dataset name 'NoSuchSet'" in one_line_error("--data", "NoSuchSet")
    torch.save({"args": {"arch": "vit_small"}, "script": "gsc_mim.py"}, tmp_path / "gsc.pth")
    assert "checkpoint of gsc_mim.py, not of this selective_mae.py" in one_line_error("--eval-only", tmp_path / "gsc.pth")
    assert "loss is " in one_line_error(*TINY, "--lr", "1e30", "--max-steps", "3", "--eval-every", "0",
                                        "--out", tmp_path / "nan")


def test_checkpoint_mismatches_are_refused(tools, capsys, tmp_path):
    ckpt = tools[0] / "checkpoint.pth"
    with pytest.raises(smae.data.UserError, match="--data UCM differs from the checkpoint's synthetic"):
        run_main(capsys, "--eval-only", ckpt, "--data", "UCM")
    with pytest.raises(smae.data.UserError, match="--split-seed 1 differs"):
        run_main(capsys, "--eval-only", ckpt, "--split-seed", "1")
    with pytest.raises(smae.data.UserError, match=r"--depth 2 \(this run: 3\)"):
        run_main(capsys, *TINY, "--epochs", "1", "--depth", "3", "--out", tmp_path, "--resume", ckpt)
    with pytest.raises(smae.data.UserError, match="--split-seed 0 \\(this run: 4\\)"):
        run_main(capsys, *TINY, "--epochs", "1", "--split-seed", "4", "--out", tmp_path, "--resume", ckpt)


def test_plain_mae_mode_runs(tmp_path, capsys, monkeypatch):
    """Plain MAE (random seeds and targets) in the same code path, without paying for HOG scores."""
    import kernels.hog

    def no_hog(*a, **k):
        raise AssertionError("plain-MAE mode must not compute HOG scores")
    monkeypatch.setattr(kernels.hog, "patch_scores", no_hog)
    out = run_main(capsys, *[*TINY, "--epochs", "1", "--max-steps", "2", "--out", tmp_path, "--mask-ratio", "0.75",
                "--recon-ratio", "0.75", "--seed-select", "random", "--target-select", "random", "--decoder", "self"])
    assert "K=16 R=48 decoder=self" in out and "max-steps 2 reached" in out


def test_adaptive_budget_runs(tmp_path, capsys):
    out = run_main(capsys, *[*TINY, "--epochs", "1", "--max-steps", "2", "--out", tmp_path, "--adaptive-budget", "--attn", "triton"])
    assert "max-steps 2 reached" in out


def test_single_kept_token_gets_one_seed():
    """K = 1 (here --mask-ratio 0.9 at N = 16): floor(K/2) = 0 seeds used to crash PSTS (amax over
    an empty selected set); the one kept token is now the top-HOG seed."""
    torch.manual_seed(0)
    tokens, scores = torch.randn(3, 16, 8), torch.rand(3, 16)
    vis = smae.psts_select(tokens, scores, 1, 2, "topk", 1.0, torch.tensor([1.0, 0, 0]))
    assert vis.shape == (3, 1) and (vis[:, 0] == scores.argmax(1)).all()
    model = smae.SelectiveMAE(make_args("--img-size", "32", "--mask-ratio", "0.9"))
    assert model.n_keep == 1
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32), torch.rand(2, 16), torch.tensor([1.0, 0, 0]))[0]).all()


def test_learning_rate_rule():
    """lr = blr * total_batch / 256 * (r / m) (CrossMAE rule), --lr-scale none|mr, --lr overrides."""
    args = make_args("--blr", "1.5e-4")
    assert smae.learning_rate(args, 256 * 8) == pytest.approx(1.5e-4 * 8 * 0.25 / 0.85)
    args.lr_scale = "none"
    assert smae.learning_rate(args, 512) == pytest.approx(3e-4)
    args.lr_scale = "mr"
    assert smae.learning_rate(args, 256) == pytest.approx(1.5e-4 * 0.85 / 0.25)
    args.lr = 1e-3
    assert smae.learning_rate(args, 256) == 1e-3


@pytest.mark.parametrize("attn,decoder", [("sdpa", "cross"), ("triton", "cross"), ("sdpa", "self")])
def test_adaptive_padding_is_hidden_by_key_masks(attn, decoder):
    """The padded tokens of --adaptive-budget (valid False) must not change any valid latent or any
    prediction (key masks, True = attend, in encoder and decoder); without the mask they would."""
    torch.manual_seed(0)
    model = smae.SelectiveMAE(make_args("--adaptive-budget", "--attn", attn, "--decoder", decoder)).eval()
    B, N, P = 2, model.num_patches, model.n_pad
    tokens, scores = torch.randn(B, N, 192), torch.rand(B, N)
    vis = torch.stack([torch.randperm(N)[:P] for _ in range(B)])
    valid = torch.arange(P)[None] < torch.tensor([[3], [P - 2]])             # 3 and P-2 valid tokens
    tgt = smae.select_targets(scores, vis, valid, model.n_targets, "topk", 1.0)
    noisy = tokens.clone()
    pad = smae.gather_tokens(noisy, vis)
    noisy.scatter_(1, vis.unsqueeze(-1).expand_as(pad), torch.where(valid[..., None], pad, 10 * torch.randn_like(pad)))
    with torch.no_grad():
        lat, km = model.encoder.forward_selected(tokens, vis, valid)
        lat2, _ = model.encoder.forward_selected(noisy, vis, valid)
        assert km.shape == (B, 1 + P) and km[:, 0].all()
        assert torch.allclose(lat[km], lat2[km], atol=1e-5)
        assert torch.allclose(model.decode(lat, vis, tgt, km), model.decode(lat2, vis, tgt, km), atol=1e-5)
        lat3, _ = model.encoder.forward_selected(noisy, vis, torch.ones_like(valid))
        assert not torch.allclose(lat[km], lat3[km], atol=1e-3)               # the test can fail


def test_compile_default_path_is_one_graph(triton_attention):
    """torch.compile sees no data-dependent shape: the forward (selection included) is one graph,
    for the default path, for --adaptive-budget (padded to a fixed length), and with the adaptive
    budget's key masks through the Triton attention kernel (a custom op: one opaque node)."""
    import torch._dynamo
    for flags in ([], ["--adaptive-budget"], ["--adaptive-budget", "--attn", "triton"]):
        torch._dynamo.reset()
        dev = triton_attention
        model = smae.SelectiveMAE(make_args(*flags)).to(dev)
        probs = smae.stage_schedule(2, 3, dev)[4]                           # a view, as in train()
        ex = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64, device=dev), torch.rand(2, 64, device=dev), probs)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()


def test_process_group_waits_for_rank0_evaluation(monkeypatch):
    """Ranks > 0 wait at the final barrier while rank 0 evaluates: the process group gets a long
    timeout (NCCL's default 10 min watchdog would kill them on a large dataset)."""
    import datetime
    seen = {}
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(smae.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(smae.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    assert smae.setup_distributed()[1] == 2
    assert seen["timeout"] >= datetime.timedelta(hours=1)


def test_patchify_is_mae_order_and_unpatchify_inverts():
    """patchify = MAE's einsum 'nchpwq->nhwpqc' (done as a permute so CUDA autocast cannot round
    the loss targets to bf16); unpatchify is its inverse."""
    x = torch.randn(2, 3, 32, 32)
    mae = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 4, 8, 4, 8)).reshape(2, 16, 192)
    assert torch.equal(smae.patchify(x, 8), mae) and torch.equal(smae.unpatchify(mae, 8, 4), x)


def test_too_small_dataset_stops_with_a_clear_message(tmp_path, capsys):
    """30 training images and batch 64: no step per epoch (drop_last) -> a one-line user error, not an IndexError."""
    with pytest.raises(smae.data.UserError, match="lower --batch-size"):
        run_main(capsys, *TINY, "--batch-size", "64", "--epochs", "1", "--out", tmp_path)


@pytest.mark.parametrize("decoder", ["cross", "self"])
def test_model_through_the_triton_kernel_matches_sdpa(decoder, triton_attention, assert_models_agree):
    """--attn triton through the kernel itself (interpreter on the CPU, compiled on a GPU), with the
    adaptive budget's padded token sets and key masks: same loss, predictions and parameter
    gradients as SDPA - in the encoder and in the decoder."""
    a, b = (smae.SelectiveMAE(make_args("--adaptive-budget", "--attn", attn, "--decoder", decoder)).to(triton_attention)
            for attn in ("sdpa", "triton"))
    images = torch.randn(3, 3, 64, 64, device=triton_attention)
    scores = torch.rand(3, 64, device=triton_attention) * torch.tensor([[1.0], [0.1], [3.0]], device=triton_attention)
    probs = smae.stage_schedule(2, 3, triton_attention)[4]
    assert_models_agree(a, b, lambda m: m(images, scores, probs)[:2])


# ----------------------------------------------------------------------------- official fidelity
def official_prune(scores, keep_ratio, chosen):
    """The official InfoBatch.prune (NUS-HPC-AI-Lab/InfoBatch infobatch.py), transcribed with its
    np.random.choice replaced by `chosen` (the well-learned samples that were drawn to stay):
    returns (the samples it trains on, their weights)."""
    scores = np.asarray(scores)
    well_learned_mask = scores < scores.mean()
    well_learned_indices = np.where(well_learned_mask)[0]
    remained_indices = np.where(~well_learned_mask)[0].tolist()
    assert len(chosen) == int(keep_ratio * len(well_learned_indices)) and set(chosen) <= set(well_learned_indices)
    weights = np.ones(len(scores))
    if len(chosen) > 0:
        weights[chosen] = 1 / keep_ratio
        remained_indices.extend(chosen)
    return sorted(remained_indices), weights


def test_infobatch_prunes_below_mean_samples_and_rescales_the_kept():
    n, epochs = 200, 8                          # delta 0.875: epochs 0-6 pruned, 7 full (official)
    ib = smae.InfoBatch(n, epochs, 0.5, 0.875, seed=0, rank=0, world=1, device="cpu")
    ib.set_epoch(0)                             # every score 3 (unseen): nothing is below the mean
    assert sorted(ib.order.tolist()) == list(range(n)) and (ib.weights == 1).all()
    g = torch.Generator().manual_seed(0)
    kept_count = np.zeros(n)
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        scores = ib.scores.numpy().copy()
        well = scores < scores.mean()
        trained = np.array(sorted(ib.order.tolist()))
        if epoch < 7:
            chosen = np.array(sorted(set(trained.tolist()) & set(np.flatnonzero(well).tolist())), dtype=np.int64)
            expected, weights = official_prune(scores, 0.5, chosen)
            assert trained.tolist() == expected and np.allclose(ib.weights.numpy(), weights)
            kept_count[well] += np.isin(np.flatnonzero(well), chosen)
            if epoch > 0:
                assert 0.2 * n < n - len(trained) < 0.35 * n    # half of the ~50% below the mean
        else:                                   # after delta * epochs: every sample, weight 1
            assert trained.tolist() == list(range(n)) and (ib.weights == 1).all()
        for it in range(len(ib) // 10):         # losses of the trained samples, weighted like the official update()
            idx = ib.batch_indices(it, 10)
            loss = torch.rand(10, generator=g) + (idx % 2).float()        # odd samples: harder
            w = ib.weights[idx].clone()
            assert torch.allclose(ib.weighted_loss(loss, idx), (loss * w).mean())
            assert torch.equal(ib.scores[idx], loss)
    odd = np.arange(n) % 2 == 1
    assert kept_count[odd].sum() < 0.1 * kept_count.sum()   # pruning falls on the easy (even) samples


def test_infobatch_identical_on_two_gloo_ranks(run_torchrun, tmp_path):
    """Under DDP every rank must hold the same scores and weights and draw the same pruned order
    (all-gathered losses, shared seed), while the ranks' shards stay disjoint."""
    script = tmp_path / "ranks.py"
    script.write_text(f'''
import importlib.util, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
spec = importlib.util.spec_from_file_location("smae", {str(REPO / "selective_mae.py")!r})
smae = importlib.util.module_from_spec(spec); spec.loader.exec_module(smae)
dist.init_process_group("gloo")
rank = dist.get_rank()
ib = smae.InfoBatch(50, 4, 0.5, 0.875, seed=3, rank=rank, world=2, device="cpu")
shards = []
for epoch in range(4):
    ib.set_epoch(epoch)
    shards.append(ib.shard().tolist())
    for it in range(len(ib) // 4):
        idx = ib.batch_indices(it, 4)
        ib.weighted_loss(torch.rand(4) + idx.float() / 50, idx)   # per-rank random losses
torch.save({{"state": ib.state_dict(), "shards": shards}}, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
''')
    run_torchrun(2, script)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(a["state"]["scores"], b["state"]["scores"]) and torch.equal(a["state"]["weights"], b["state"]["weights"])
    assert (a["state"]["order"] == b["state"]["order"]).all()
    assert (a["state"]["scores"] != 3).sum() > 40                  # both ranks' losses recorded on both
    for sa, sb in zip(a["shards"], b["shards"]):
        assert not set(sa) & set(sb) and len(sa) == len(sb)
    assert len(a["shards"][1]) < 25                                # epoch 1 was pruned


def test_infobatch_run_resumes_exactly_and_saves_steps(tmp_path, capsys):
    common = [*TINY, "--batch-size", "4", "--epochs", "3", "--no-eval", "--infobatch", "1"]   # 30 train: 7 steps
    run_main(capsys, *common, "--out", tmp_path / "a")
    run_main(capsys, *common, "--out", tmp_path / "b", "--max-steps", "9")         # inside pruned epoch 1
    out = run_main(capsys, *common, "--out", tmp_path / "b", "--resume", "auto")
    assert "resumed" in out and "epoch 1 step 2" in out
    a, b = [[r for r in smae.read_log(tmp_path / run / "log.jsonl") if "loss" in r] for run in "ab"]
    assert len(a) == len(b) == 3 and [r["loss"] for r in a] == [r["loss"] for r in b], (a, b)
    steps = [r["step"] for r in a]                                   # optimizer steps so far
    assert steps[0] == 7 and steps[2] - steps[0] < 14                # epochs 1-2 pruned


def test_sample_mode_is_not_topk_at_the_default_temperature():
    """--seed-select sample draws from softmax(z / T) of per-image standardised HOG scores: at T = 1
    it overlaps top-k far less than the raw scores' near one-hot softmax did (91% on UCM), yet more
    than chance; and it does not depend on the scores' scale (the dataset's contrast)."""
    import data
    images = torch.stack([torch.from_numpy(data.synthetic_scene(0, i, 128)[0]).permute(2, 0, 1) for i in range(8)])
    scores = smae.hog_patch_scores(data.normalize(images), 16)                      # [8, 64]
    k = 5                                                                           # floor(K/2) at m = 0.85
    top = scores.topk(k, dim=1).indices
    torch.manual_seed(0)
    overlap = []
    for _ in range(50):
        picked = smae.gumbel_keys(scores, 1.0).topk(k, dim=1).indices
        overlap.append((picked[:, :, None] == top[:, None, :]).any(-1).float().mean())
    overlap = torch.stack(overlap).mean().item()
    assert k / 64 + 0.1 < overlap < 0.7, overlap
    torch.manual_seed(1)
    a = smae.gumbel_keys(scores, 1.0)
    torch.manual_seed(1)
    assert torch.allclose(a, smae.gumbel_keys(17 * scores + 5, 1.0), atol=1e-4)


def test_cross_decoder_keys_values_from_the_encoder_width():
    """The official (CrossMAE) layout: every cross block projects keys/values from the encoder
    width, CrossAttention(encoder_dim, decoder_dim), with no shared decoder_embed before it;
    checked against the blocks written out by hand."""
    model = smae.SelectiveMAE(make_args())
    D, d = 192, 256
    assert all(blk.attn.kv.weight.shape == (2 * d, D) for blk in model.decoder_blocks)
    assert not any("decoder_embed" in n for n, _ in model.named_parameters())
    latent = torch.randn(2, 1 + model.n_keep, D)
    tgt = torch.stack([torch.randperm(64)[:model.n_targets] for _ in range(2)])
    with torch.no_grad():
        x = model.mask_token + smae.gather_tokens(model.decoder_pos_embed[:, 1:].expand(2, -1, -1), tgt)
        for blk in model.decoder_blocks:   # LN -> cross-attention to the latent -> LN -> MLP
            a = blk.attn
            q = a.q(blk.norm1(x)).reshape(2, -1, 8, d // 8).transpose(1, 2)
            k, v = a.kv(latent).reshape(2, -1, 2, 8, d // 8).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-1, -2)) * (d // 8) ** -0.5).softmax(-1) @ v
            x = x + a.proj(att.transpose(1, 2).reshape(2, -1, d))
            x = x + blk.mlp(blk.norm2(x))
        expected = model.decoder_pred(model.decoder_norm(x))
        assert torch.allclose(model.decode(latent, None, tgt, None), expected, atol=1e-5)
