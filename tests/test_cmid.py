"""cmid.py: masking, cell matching, losses, queue, Adan, training, resume, DDP, export (CPU, tiny)."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
import torch

import cmid
import data
from conftest import REPO

# A tiny configuration: 2-block ViT-Tiny at 32 px (2x2 tokens), 30 synthetic training images, batch 8.
TINY = ["--data", "synthetic", "--arch", "vit_tiny", "--depth", "2", "--img-size", "32", "--patch-size", "16",
        "--mask-patch-size", "16", "--synthetic-images", "40", "--batch-size", "8", "--workers", "0",
        "--proj-hidden", "32", "--proj-dim", "16", "--local-hidden", "32", "--local-bottleneck", "16",
        "--local-out", "32", "--queue-size", "100", "--local-pairs", "3", "--warmup-epochs", "1",
        "--log-every", "1", "--eval-every", "0", "--cache", "none"]


def tiny_args(*extra):
    args = cmid.resolve_args(cmid.get_args_parser().parse_args(TINY + list(extra)))
    args.lr = 1e-3 if args.lr is None else args.lr
    return args


def test_mask_counts_uniformity_and_mean_fill():
    torch.manual_seed(0)
    masks = cmid.random_grid_masks(4000, 7, 0.6, "cpu")
    assert masks.shape == (4000, 7, 7)
    assert (masks.flatten(1).sum(1) == 30).all()                      # ceil(0.6 * 49) = 30 of 49
    freq = masks.float().mean(0)                                      # uniform: every cell ~30/49
    assert (freq - 30 / 49).abs().max() < 0.04
    mpix = cmid.pixel_mask(masks[:2], 224)
    assert mpix.shape == (2, 1, 224, 224)
    assert torch.equal(mpix[:, 0, ::32, ::32], masks[:2].float())     # 32-px blocks
    assert mpix.sum() == 2 * 30 * 32 * 32
    x = torch.randn(2, 3, 224, 224)
    filled = cmid.mean_fill(x, mpix)
    mean = x.mean((2, 3))                                             # per image, per channel
    m = mpix[:, 0].bool()
    for b in range(2):
        for c in range(3):
            assert torch.allclose(filled[b, c][m[b]], mean[b, c].expand(int(m[b].sum())))
            assert torch.equal(filled[b, c][~m[b]], x[b, c][~m[b]])


def test_cell_matching_uses_pixel_boxes_and_flips():
    # 2x2 cells. View 1 = box (0,0)-(64,64): centres (16,16) (48,16) (16,48) (48,48).
    # View 2 = box (32,32)-(96,96): centres (48,48) (80,48) (48,80) (80,80).
    b1 = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    b2 = torch.tensor([[32.0, 32.0, 96.0, 96.0]])
    no = torch.tensor([False])
    i1, i2 = cmid.match_cells(b1, no, b2, no, 2, 1)
    assert (i1.item(), i2.item()) == (3, 0)                           # both centres at (48,48)
    # the next 4 pairs are all at distance 32: (1,0) (2,0) (3,1) (3,2); k is capped at the 4 cells
    i1, i2 = cmid.match_cells(b1, no, b2, no, 2, 20)
    pairs = set(zip(i1[0].tolist(), i2[0].tolist()))
    assert i1.shape == (1, 4) and (3, 0) in pairs and pairs < {(3, 0), (1, 0), (2, 0), (3, 1), (3, 2)}
    i1, _ = cmid.match_cells(b1.expand(3, 4), no.expand(3), b2.expand(3, 4), no.expand(3), 7, 20)
    assert i1.shape == (3, 20)                                        # the paper's 20 of 49 x 49 pairs
    # view 2 flipped: its column 1 now shows the crop's left half, so (48,48) is cell 1
    i1, i2 = cmid.match_cells(b1, no, b2, torch.tensor([True]), 2, 1)
    assert (i1.item(), i2.item()) == (3, 1)
    centres = cmid.cell_centres(b2, torch.tensor([True]), 2)
    assert torch.equal(centres[0], torch.tensor([[80.0, 48.0], [48.0, 48.0], [80.0, 80.0], [48.0, 80.0]]))


def test_focal_l1_value():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.full((1, 3, 2, 2), 2.0)
    target[..., 1, 1] = 100.0                                         # unmasked: must not count
    mpix = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    expected = 2 * (2 / (1 + math.exp(-0.4)) - 1)                     # |d| (2 sigmoid(0.2|d|) - 1), d = 2
    assert cmid.focal_l1_loss(pred, target, mpix).item() == pytest.approx(expected, rel=1e-6)


def test_focal_frequency_value_and_stop_gradient():
    # 2x2 image: the orthonormal DFT is F[k,l] = 1/2 sum x[m,n] (-1)^(km+ln).
    pred = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2).requires_grad_()
    target = torch.zeros(1, 1, 2, 2)
    mpix = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # composite = masked pred + unmasked 0.5 pred + 0.5 x = [[2,0],[0,1]]; its DFT = [[1.5,.5],[.5,1.5]]
    # |diff|^2 = [[2.25,.25],[.25,2.25]]; weights log(1+|diff|)/max = 1 and log(1.5)/log(2.5)
    w = math.log(1.5) / math.log(2.5)
    expected = (2 * 2.25 + 2 * 0.25 * w) / 4
    loss = cmid.focal_frequency_loss(pred, target, mpix)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pred.grad[0, 0, 1, 1] == 0 and pred.grad[0, 0, 0, 1] == 0  # unmasked: stop-gradient
    assert pred.grad[0, 0, 0, 0] != 0


def test_queue_ring_buffer_wraps_and_keeps_newest():
    state = cmid.MethodState(queue_size=5, key_dim=1, local_out=4, seed=0)
    keys = lambda *v: torch.tensor(v, dtype=torch.float32).view(-1, 1)    # noqa: E731
    state.enqueue(keys(1, 2, 3))
    assert state.queue_ptr.item() == 3
    state.enqueue(keys(4, 5, 6, 7))                                   # wraps: slots 3, 4, 0, 1
    assert state.queue.flatten().tolist() == [6, 7, 3, 4, 5] and state.queue_ptr.item() == 2
    state.enqueue(keys(8, 9, 10, 11, 12, 13, 14))                     # more keys than slots
    # as if written one by one from slot 2: the last 5 keys survive, pointer (2 + 7) % 5 = 4
    assert state.queue.flatten().tolist() == [11, 12, 13, 14, 10] and state.queue_ptr.item() == 4


def test_infonce_and_local_loss_values():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    logits = torch.tensor([1.0, 0.0, -1.0]) / 0.2
    assert cmid.infonce_loss(q, k, queue, 0.2).item() == pytest.approx(-torch.log_softmax(logits, 0)[0].item(), rel=1e-6)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    c = torch.randn(1, 5, 1)
    ref = -(torch.softmax((t - c) / 0.04, 1) * torch.log_softmax(s / 0.1, 1)).sum(1).mean()
    assert torch.allclose(cmid.local_distill_loss(s, t, c, 0.1, 0.04), ref)


def test_adan_two_steps_match_equations():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    lr, wd, eps, (b1, b2, b3) = 0.1, 0.02, 1e-8, (0.98, 0.92, 0.99)
    opt = cmid.Adan([p], lr=lr, weight_decay=wd)
    g1, g2 = [0.5, -1.0], [0.3, 2.0]
    p.grad = torch.tensor(g1)
    opt.step()
    # step 1: d = 0, m = (1-b1) g, v = 0, n = (1-b3) g^2 -> bias-corrected update g / (|g| + eps)
    exp1 = [(x - lr * g / (abs(g) + eps)) / (1 + lr * wd) for x, g in zip([1.0, -2.0], g1)]
    assert p.tolist() == pytest.approx(exp1, rel=1e-6)
    p.grad = torch.tensor(g2)
    opt.step()
    exp2 = []
    for x, ga, gb in zip(exp1, g1, g2):
        d = gb - ga
        m = b1 * (1 - b1) * ga + (1 - b1) * gb
        v = (1 - b2) * d
        n = b3 * (1 - b3) * ga ** 2 + (1 - b3) * (gb + b2 * d) ** 2
        u = (m / (1 - b1 ** 2) + b2 * v / (1 - b2 ** 2)) / (math.sqrt(n / (1 - b3 ** 2)) + eps)
        exp2.append((x - lr * u) / (1 + lr * wd))                    # Alg. 1: (1 + lr wd)^-1 [theta - lr u]
    assert p.tolist() == pytest.approx(exp2, rel=1e-5)


def test_weight_decay_groups_skip_1d_and_tokens():
    args = tiny_args()
    student = cmid.Student(args)
    decay, no_decay = cmid.param_groups(student, 0.02)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "encoder.backbone.cls_token", "encoder.backbone.pos_embed"} <= skipped
    assert no_decay["weight_decay"] == 0.0


def one_step(args, batch=4, steps=1, fixed=False):
    device = torch.device("cpu")
    student, teacher, state = cmid.build_models(args, device, 1)
    optimizer = cmid.build_optimizer(student, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    n = steps + 1
    sched = {"lr": [args.lr] * n, "momentum": [0.99] * n, "teacher_temp": [0.04] * n}
    aug = cmid.build_views(args, device)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, args.img_size, args.img_size), dtype=torch.uint8)
    history = []
    for s in range(steps):
        if fixed:
            torch.manual_seed(0)   # same views and masks every step: overfit one batch
        losses = cmid.train_step(student, teacher, state, optimizer, scaler, images, aug, sched, s, args, device)
        history.append({k: v.item() for k, v in losses.items()})
    return student, teacher, state, history


@pytest.mark.parametrize("arch,size", [("vit_tiny", "32"), ("resnet50", "64")])
def test_both_architectures_take_a_step(arch, size):
    args = tiny_args("--arch", arch, "--img-size", size, "--mask-patch-size", "16" if arch == "vit_tiny" else "32")
    student, teacher, state, hist = one_step(args, batch=2)
    assert all(math.isfinite(v) for v in hist[0].values())
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    assert state.queue_ptr.item() == 2 * 2                            # both views' keys, once each
    # the EMA moved the teacher towards the (updated) student, but not onto it
    sp, tp = dict(student.encoder.named_parameters()), dict(teacher.named_parameters())
    name = "backbone.conv1.weight" if arch == "resnet50" else "backbone.patch_embed.proj.weight"
    assert not torch.equal(sp[name], tp[name])
    assert state.centre.abs().sum() > 0


def test_loss_falls_when_overfitting_one_batch():
    # Same images, views and masks every step. The global term is weighted 0 here: its queue fills with
    # this very batch's keys, i.e. negatives identical to the positives, so it must rise.
    args = tiny_args("--optimizer", "adamw", "--lr", "1e-3", "--w-global", "0")
    _, _, _, hist = one_step(args, batch=4, steps=6, fixed=True)
    assert hist[-1]["mim"] < 0.8 * hist[0]["mim"]
    assert hist[-1]["local"] < 0.9 * hist[0]["local"]
    assert hist[-1]["loss"] < 0.85 * hist[0]["loss"]


def read_log(path):
    return [json.loads(line) for line in open(path / "log.jsonl")]


def test_exact_resume_after_preemption_max_steps_and_a_lost_tail(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = TINY + ["--epochs", "2", "--no-eval"]                     # 30 train images: 3 steps per epoch
    cmid.main(common + ["--out", str(a)])
    check = data.SavePoints.check
    def preempt_at_2(self, step):                                     # SIGTERM seen at the step-2 boundary
        self.signal = "SIGTERM" if step == 2 else self.signal
        return (True, True) if step == 2 else check(self, step)
    monkeypatch.setattr(data.SavePoints, "check", preempt_at_2)
    b_args = common + ["--out", str(b), "--eval-every", "1"]           # kNN evaluations must not change training
    assert cmid.main(b_args) is None
    assert "preempted (SIGTERM): checkpoint" in capsys.readouterr().out
    assert torch.load(b / "checkpoint.pth", weights_only=False)["global_step"] == 2
    monkeypatch.setattr(data.SavePoints, "check", check)
    load = data.load_checkpoint
    class OnAnotherDevice:                                            # an RNG state torch.set_rng_state would reject
        def __init__(self, t):
            self.t = t
        def cpu(self):
            return self.t
    def load_rng_elsewhere(path):
        ck = load(path)
        for r in ck["ranks"]:
            r["rng"]["torch"] = OnAnotherDevice(r["rng"]["torch"])
        return ck
    monkeypatch.setattr(data, "load_checkpoint", load_rng_elsewhere)
    cmid.main(b_args + ["--resume", "auto", "--max-steps", "3"])      # mid-epoch 1 -> end of epoch 1
    assert "stopped at --max-steps 3" in capsys.readouterr().out and read_log(b)[-1]["step"] == 3
    shutil.copy(b / "checkpoint.pth", tmp_path / "step3.pth")
    cmid.main(b_args + ["--resume", "auto"])
    shutil.copy(tmp_path / "step3.pth", b / "checkpoint.pth")         # killed after step 3's save: the log ran ahead
    cmid.main(b_args + ["--resume", "auto"])
    la, lb = read_log(a), read_log(b)
    assert [(r["epoch"], "knn" in r) for r in lb if "epoch" in r] == [(1, False), (1, True), (2, False), (2, True)]
    assert "knn_floor" in lb[0] and [r["images_seen"] for r in lb[1:]] == [24, 24, 48, 48]
    for ra, rb in zip(la, [r for r in lb if "loss" in r]):
        for k in ("loss", "mim", "global", "local", "lr", "step", "images_seen"):
            assert ra[k] == rb[k], (k, ra, rb)
    ca, cb = (torch.load(p / "checkpoint.pth", weights_only=False) for p in (a, b))
    for key in ("teacher", "state"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), name
    assert (b / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_crops_from_load_size_and_evaluation_resizes_to_img_size(tmp_path, monkeypatch):
    sizes = {}
    build = data.build_loader
    def spy(name, root, split, **kw):
        sizes.setdefault(split, kw["size"])
        return build(name, root, split, **kw)
    monkeypatch.setattr(data, "build_loader", spy)
    cmid.main(TINY + ["--epochs", "1", "--load-size", "48", "--eval-every", "1", "--out", str(tmp_path)])
    assert sizes == {"train": 48, "test": 32, "train1": 32}
    assert json.loads((tmp_path / "args.json").read_text())["load_size"] == 48


def test_ddp_gradients_keep_the_parameter_layout():
    # bf16 autocast on the CPU gives the mim head's 1x1 conv a channels-last weight gradient from the ViT map, as cudnn
    # does on GPUs; DDP copies (and warns) for every gradient whose strides are not its parameter's
    args = tiny_args("--img-size", "64", "--amp", "bf16")
    student, _, _, _ = one_step(args, batch=2)
    bad = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert bad == []


def two_nodes(*args, timeout=120):
    """Two torchrun 'nodes' of one process each on this host (c10d rendezvous, gloo), running the probe."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex,
           str(REPO / "tests" / "cmid_ddp_probe.py"), *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    return "".join(o for o, _ in outs), "".join(e for _, e in outs)


def test_two_nodes_agree_checkpoint_and_resume(tmp_path):
    # 30 train images, 2 ranks, batch 8: one step per epoch; a kNN evaluation on rank 0 after each epoch
    out = tmp_path / "run"
    common = TINY + ["--epochs", "3", "--eval-every", "1", "--no-eval", "--amp", "bf16", "--out", out]
    stdout, stderr = two_nodes(*common, "--max-steps", "2")
    sums = dict(re.findall(r"rank (\d) of 2 checksum (\S+)", stdout))
    assert len(sums) == 2 and sums["0"] == sums["1"]                 # identical parameters on both ranks
    assert "grad strides do not match" not in stderr.lower()
    ck = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ck["global_step"] == 2 and len(ck["ranks"]) == 2 and read_log(out)[-1]["step"] == 2
    stdout, _ = two_nodes(*common, "--resume", "auto")
    sums = dict(re.findall(r"rank (\d) of 2 checksum (\S+)", stdout))
    assert "resumed from" in stdout and len(sums) == 2 and sums["0"] == sums["1"]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["global_step"] == 3
    assert [r["epoch"] for r in read_log(out) if "knn" in r] == [1, 2, 3]


def test_two_process_torchrun_shares_one_queue(tmp_path, run_torchrun):
    out = tmp_path / "ddp"
    run_torchrun(2, "cmid.py", *TINY, "--epochs", "1", "--no-eval", "--out", out)
    ck = torch.load(out / "checkpoint.pth", weights_only=False)
    # 30 train images -> 15 per rank -> 1 step of 8; keys: 2 ranks x 2 views x 8, gathered once
    assert ck["state"]["queue_ptr"].item() == 32
    queue = ck["state"]["queue"]
    fresh = cmid.MethodState(100, 16, 32, seed=0).queue
    assert torch.equal(queue[32:], fresh[32:])                       # untouched slots
    written = queue[:32]
    dist = torch.cdist(written, written) + torch.eye(32) * 10
    assert dist.min() > 1e-4                                          # no key enqueued twice
    assert len(ck["ranks"]) == 2 and len(read_log(out)) == 1


def test_export_uses_torchvision_and_timm_names(tmp_path):
    expected = {"conv1.weight"} | {f"bn1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                         "num_batches_tracked")}
    for li, blocks in enumerate((3, 4, 6, 3), 1):
        for bi in range(blocks):
            pre = f"layer{li}.{bi}."
            expected |= {pre + f"conv{j}.weight" for j in (1, 2, 3)}
            expected |= {pre + f"bn{j}.{s}" for j in (1, 2, 3) for s in ("weight", "bias", "running_mean",
                                                                            "running_var", "num_batches_tracked")}
            if bi == 0:
                expected |= {pre + "downsample.0.weight"} | {pre + f"downsample.1.{s}" for s in (
                    "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    vit = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        vit |= {f"blocks.{i}.{m}.{s}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                for s in ("weight", "bias")}
    for arch, keys in (("resnet50", expected), ("vit_tiny", vit)):
        args = tiny_args("--arch", arch, "--img-size", "64", "--mask-patch-size", "32", "--out", str(tmp_path), "--export", "ck")
        enc = cmid.Encoder(args)
        sd = cmid.checkpoint_mode({"teacher": enc.state_dict(), "args": vars(args)}, args, torch.device("cpu"))
        assert set(sd) == keys, set(sd) ^ keys
        assert len(keys) == (318 if arch == "resnet50" else 6 + 2 * 12)
        assert torch.load(tmp_path / "backbone.pth").keys() == sd.keys()


def test_script_trains_then_checkpoint_modes_work_from_the_checkpoint_alone(tmp_path, run_script, capsys):
    out = tmp_path / "custom"
    proc = run_script("cmid.py", *TINY, "--epochs", "2", "--seed", "3", "--eval-every", "1", "--out", out)
    assert "linear@1%" in proc.stdout and "random init" in proc.stdout and "time to accuracy:" in proc.stdout
    trained = json.loads((out / "eval.json").read_text())
    assert set(trained) == {"cmid", "random init"} and set(trained["cmid"]) == {"linear@1%", "linear@100%", "knn"}
    assert [r for r in read_log(out) if "knn" in r][-1]["knn"] == trained["cmid"]["knn"]   # one kNN protocol
    assert json.loads((out / "splits.json").read_text())["seed"] == 0                     # --split-seed, not --seed
    moved = tmp_path / "moved"                                        # outputs go beside the checkpoint, wherever
    moved.mkdir()
    for name in ("checkpoint.pth", "log.jsonl"):
        shutil.move(out / name, moved / name)
    ck = str(moved / "checkpoint.pth")
    capsys.readouterr()
    cmid.main(["--eval-only", ck, "--seed", "5", "--workers", "0"])   # data, split, model: the checkpoint's
    header = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("evaluation on")]
    assert header == [ln for ln in proc.stdout.splitlines() if ln.startswith("evaluation on")]
    assert json.loads((moved / "eval.json").read_text())["cmid"] == trained["cmid"]
    assert (moved / "curves.png").is_file()
    cmid.main(["--visualize", ck])
    from PIL import Image
    assert Image.open(moved / "visualize.png").size == (4 * 32, 8 * 32)
    cmid.main(["--export", ck])
    assert len(torch.load(moved / "backbone.pth")) == 6 + 2 * 12
    with pytest.raises(data.UserError, match="was trained with --split-seed 0, not --split-seed 1"):
        cmid.main(["--eval-only", ck, "--split-seed", "1"])
    assert cmid.main(TINY + ["--out", str(out), "--bench", "1"]) is None
    assert "data side" in capsys.readouterr().out


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    proc = subprocess.run([sys.executable, str(REPO / "cmid.py"), "--data", "UCM", "--data-root", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: UCM not found")
    torch.save({"args": {"arch": "vit_tiny"}, "model": {}, "teacher": None}, tmp_path / "mae.pth")   # selective_mae's keys
    vit = tmp_path / "vit"
    cmid.main(TINY + ["--epochs", "1", "--max-steps", "1", "--no-eval", "--out", str(vit)])
    cases = {"unknown dataset name 'nope'": ["--data", "nope"],
             "is a checkpoint of another script": ["--eval-only", str(tmp_path / "mae.pth")],
             "was trained with --arch vit_tiny --img-size 32 --mask-patch-size 16, not --arch resnet50": TINY + [
                 "--arch", "resnet50", "--img-size", "64", "--mask-patch-size", "32", "--out", str(vit), "--resume", "auto"],
             "loss is nan at step 2: lower --lr": TINY + ["--lr", "1e30", "--out", str(tmp_path / "nan")]}
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            data.run_main(cmid.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_vit_attention_backends_agree():
    # --attn triton goes through kernels.attention (its torch path on the CPU) and must match SDPA
    torch.manual_seed(0)
    a = cmid.VisionTransformer(32, 16, 192, 1, 3, "sdpa")
    b = cmid.VisionTransformer(32, 16, 192, 1, 3, "triton")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    (ga, fa), (gb, fb) = a(x), b(x)
    assert torch.allclose(ga, gb, atol=1e-5) and torch.allclose(fa, fb, atol=1e-5)


def test_local_logits_are_fp32_under_bf16_autocast():
    # teacher T 0.04 magnifies the rounding of bf16 logits (spacing 2^-8 near 1) 25x: the weight-normed
    # last layer runs in fp32 even inside the bf16 autocast that the networks use on the GPU
    torch.manual_seed(0)
    head = cmid.LocalHead(16, 32, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 16, 3, 3))
    assert out.dtype == torch.float32 and out.shape == (4, 64, 9)
    assert not torch.equal(out, out.bfloat16().float())               # not bf16-rounded values


@pytest.mark.parametrize("arch,size", [("vit_tiny", "32"), ("resnet50", "64")])
def test_bf16_step_runs_and_losses_are_fp32(arch, size):
    # the GPU's bf16 path (autocast around the networks only) exercised on the CPU
    args = tiny_args("--arch", arch, "--img-size", size, "--mask-patch-size", "16" if arch == "vit_tiny" else "32",
                     "--amp", "bf16")
    _, _, state, hist = one_step(args, batch=2)
    assert all(math.isfinite(v) for v in hist[0].values())
    assert state.queue.dtype == torch.float32 and state.centre.dtype == torch.float32


def test_eval_feat_cls_avg_concatenates_mean_patch_token():
    vit = cmid.VisionTransformer(32, 16, 192, 1, 3)
    batch = [(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.zeros(3, dtype=torch.long))]
    for feat, dim in (("cls", 192), ("cls+avg", 384)):
        args = tiny_args("--eval-feat", feat)
        f, y = cmid.extract_features(vit, batch, torch.device("cpu"), args)
        assert f.shape == (3, dim) and torch.allclose(f.norm(dim=1), torch.ones(3))


def test_local_head_centre_and_temperatures_can_learn():
    # the local path alone (head, EMA teacher, centre, temperatures) on fixed per-cell features: the
    # loss must leave log(K) and approach its floor, the entropy of the centred, sharpened teacher
    torch.manual_seed(0)
    head = cmid.LocalHead(32, 64, 16, 128)
    teacher = cmid.copy.deepcopy(head).requires_grad_(False)
    state = cmid.MethodState(8, 4, 128, seed=0)
    feats = torch.randn(8, 32, 3, 3)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(20):
        s = head(feats)
        with torch.no_grad():
            t = teacher(feats)
        loss = cmid.local_distill_loss(s, t, state.centre, 0.1, 0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cmid.ema_update(head, teacher, 0.99)
        state.update_centre(t, 0.9)
    tp = torch.softmax((t - state.centre) / 0.04, 1)
    floor = -(tp * tp.log()).sum(1).mean().item()
    assert loss.item() < math.log(128) - 2 and loss.item() - floor < 0.2, (loss.item(), floor)


def test_vit_through_the_triton_kernel_matches_sdpa(triton_attention, assert_models_agree):
    # the kernel itself (interpreter on the CPU, compiled on a GPU) in the script's ViT: same forward
    # and parameter gradients as SDPA
    torch.manual_seed(0)
    a, b = (cmid.VisionTransformer(32, 16, 192, 2, 3, attn).to(triton_attention) for attn in ("sdpa", "triton"))
    x = torch.randn(2, 3, 32, 32, device=triton_attention)
    assert_models_agree(a, b, lambda m: m(x))
