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
import torch.nn.functional as F

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


def official_position_match(loc_in, loc_cand, k):
    """Independent transcription of official contrastive_utils.position_match / neirest_neighbores."""
    d = torch.cdist(loc_in, loc_cand)
    vals, idx = d.topk(k=1, largest=False)
    vals, idx = vals.squeeze(-1), idx.squeeze(-1)
    _, order = torch.sort(vals, dim=1)
    _, rank = torch.sort(order, dim=1)
    keep = rank < k
    B = loc_in.shape[0]
    cand = idx.masked_select(keep).reshape(B, k)
    inp = torch.arange(loc_in.shape[1]).repeat(B, 1).masked_select(keep).reshape(B, k)
    return inp, cand


def test_cell_matching_uses_pixel_boxes_and_flips():
    # 2x2 cells. View 1 = box (0,0)-(64,64): centres (16,16) (48,16) (16,48) (48,48).
    # View 2 = box (32,32)-(96,96): centres (48,48) (80,48) (48,80) (80,80).
    b1 = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    b2 = torch.tensor([[32.0, 32.0, 96.0, 96.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    c1, c2 = cmid.cell_centres(b1, no, 2), cmid.cell_centres(b2, no, 2)
    cells, partners = cmid.match_cells(c1, c2, 1)
    assert (cells.item(), partners.item()) == (3, 0)                   # both centres at (48,48)
    cells, partners = cmid.match_cells(c1, c2, 20)                    # k capped at the 4 cells, each once
    assert sorted(zip(cells[0].tolist(), partners[0].tolist())) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    cells, partners = cmid.match_cells(c2, c1, 20)                    # the other direction: its own nearest
    assert sorted(zip(cells[0].tolist(), partners[0].tolist())) == [(0, 3), (1, 3), (2, 3), (3, 3)]
    # view 2 flipped: its column 1 now shows the crop's left half, so (48,48) is cell 1
    cells, partners = cmid.match_cells(c1, cmid.cell_centres(b2, yes, 2), 1)
    assert (cells.item(), partners.item()) == (3, 1)
    centres = cmid.cell_centres(b2, yes, 2)
    assert torch.equal(centres[0], torch.tensor([[80.0, 48.0], [48.0, 48.0], [80.0, 80.0], [48.0, 80.0]]))


def test_cell_matching_equals_the_official_rule():
    # the paper's 7x7 grid, random boxes: the same 20 (cell, nearest partner) pairs as the official code
    torch.manual_seed(0)
    xy = torch.rand(6, 2) * 100
    wh = 60 + torch.rand(6, 2) * 100
    b1, b2 = torch.cat([xy, xy + wh], 1), torch.cat([xy.flip(0), xy.flip(0) + wh.flip(0)], 1)
    flips = torch.tensor([False, True, False, True, True, False])
    c1, c2 = cmid.cell_centres(b1, flips, 7), cmid.cell_centres(b2, flips.flip(0), 7)
    for a, b in ((c1, c2), (c2, c1)):
        cells, partners = cmid.match_cells(a, b, 20)
        ref_in, ref_cand = official_position_match(a, b, 20)
        assert cells.shape == (6, 20)
        for i in range(6):
            assert sorted(zip(cells[i].tolist(), partners[i].tolist())) == sorted(zip(ref_in[i].tolist(),
                                                                                      ref_cand[i].tolist()))


def test_vit_local_grid_is_the_resnet_grid():
    # a ViT/16 map (14x14 at 224 px) is pooled to ResNet's 7x7: both match 20 of 49 cells
    fmap = torch.randn(2, 8, 14, 14)
    cells = torch.tensor([[0, 48], [5, 7]])                           # flat indices on the 7x7 grid
    picked = cmid.local_cells(fmap, 16, cells)
    assert picked.shape == (2, 8, 2)
    assert torch.allclose(picked[1, :, 1], fmap[1, :, 2:4, 0:2].mean((1, 2)))     # cell 7 = row 1, column 0
    assert torch.allclose(picked[0, :, 1], fmap[0, :, 12:14, 12:14].mean((1, 2)))  # cell 48 = row 6, column 6
    resnet_map = torch.randn(2, 8, 7, 7)                              # ResNet: the map itself
    assert torch.equal(cmid.local_cells(resnet_map, 32, cells)[1, :, 0], resnet_map[1, :, 0, 5])


def test_focal_l1_value():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.full((1, 3, 2, 2), 2.0)
    target[..., 1, 1] = 100.0                                         # unmasked: must not count
    mpix = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    expected = 2 * (2 / (1 + math.exp(-0.4)) - 1)                     # |d| (2 sigmoid(0.2|d|) - 1), d = 2
    assert cmid.focal_l1_loss(pred, target, mpix).item() == pytest.approx(expected, rel=1e-6)


def official_ffl(pred, target, mask, unmask_weight=0.001):
    """Independent transcription of the official MIMLossHead frequency branch (fft_unmask_replace "mixed")
    and FocalFrequencyLoss(loss_weight=1, alpha=1, ave_spectrum=True, log_matrix=True, batch_matrix=True)."""
    x_replace = 0.5 * pred.clone().detach() + 0.5 * target.clone()
    mask_f = mask + (1.0 - mask) * unmask_weight
    x_rec = pred * mask_f + x_replace * (1.0 - mask_f)
    fp, ft = torch.fft.fft2(x_rec, dim=(2, 3), norm="ortho"), torch.fft.fft2(target, dim=(2, 3), norm="ortho")
    fp, ft = torch.stack([fp.real, fp.imag], -1), torch.stack([ft.real, ft.imag], -1)
    fp, ft = fp.mean(0, keepdim=True), ft.mean(0, keepdim=True)
    m = (fp - ft) ** 2
    m = torch.sqrt(m[..., 0] + m[..., 1]) ** 1.0
    m = torch.log(m + 1.0)
    m = m / m.max()
    m[torch.isnan(m)] = 0.0
    w = torch.clamp(m, min=0.0, max=1.0).clone().detach()
    tmp = (fp - ft) ** 2
    return (w * (tmp[..., 0] + tmp[..., 1])).mean()


def test_focal_frequency_equals_the_official_loss_and_gradient():
    torch.manual_seed(0)
    target = torch.randn(8, 3, 32, 32)
    mpix = cmid.pixel_mask(cmid.random_grid_masks(8, 4, 0.6, "cpu"), 32)
    pred = (target + 0.5 * torch.randn_like(target)).requires_grad_()
    ref_pred = pred.detach().clone().requires_grad_()
    loss, ref = cmid.focal_frequency_loss(pred, target, mpix), official_ffl(ref_pred, target, mpix)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward(), ref.backward()
    assert torch.allclose(pred.grad, ref_pred.grad, rtol=1e-4, atol=1e-10)
    # off the mask only 0.001 of the prediction is left (fft_unmask_weight)
    on, off = mpix.expand_as(pred).bool(), ~mpix.expand_as(pred).bool()
    assert pred.grad[off].abs().mean() < 0.01 * pred.grad[on].abs().mean()
    # the mini-batch spectrum average: a per-image version (the old rule) is far larger on these inputs
    per_image = sum(official_ffl(pred[i:i + 1].detach(), target[i:i + 1], mpix[i:i + 1]) for i in range(8)) / 8
    assert per_image > 3 * loss


def test_focal_frequency_hand_value():
    # 2 images of 1x2x2, fully masked; orthonormal 2x2 DFT F[k,l] = 1/2 sum x[m,n] (-1)^(km+ln).
    # pred - target: image 1 [[2,0],[0,2]], image 2 zeros -> batch-mean difference [[1,0],[0,1]],
    # its DFT [[1,0],[0,1]]: |d|^2 = [[1,0],[0,1]], weight log(2)/log(2) = 1 where non-zero -> mean 2/4
    pred = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    loss = cmid.focal_frequency_loss(pred, torch.zeros_like(pred), torch.ones(2, 1, 2, 2))
    assert loss.item() == pytest.approx(0.5, rel=1e-6)


def test_queue_ring_buffer_wraps_and_keeps_newest():
    state = cmid.MethodState(queue_size=5, key_dim=1, local_out=4, seed=0)
    keys = lambda *v: torch.tensor(v, dtype=torch.float32).view(-1, 1)    # noqa: E731
    ids = lambda *v: 100 + torch.tensor(v)                                # noqa: E731
    assert state.queue_ids.tolist() == [-1] * 5
    state.enqueue(keys(1, 2, 3), ids(1, 2, 3))
    assert state.queue_ptr.item() == 3
    state.enqueue(keys(4, 5, 6, 7), ids(4, 5, 6, 7))                  # wraps: slots 3, 4, 0, 1
    assert state.queue.flatten().tolist() == [6, 7, 3, 4, 5] and state.queue_ptr.item() == 2
    state.enqueue(keys(*range(8, 15)), ids(*range(8, 15)))            # more keys than slots
    # as if written one by one from slot 2: the last 5 keys survive, pointer (2 + 7) % 5 = 4
    assert state.queue.flatten().tolist() == [11, 12, 13, 14, 10] and state.queue_ptr.item() == 4
    assert (state.queue_ids - 100).tolist() == [11, 12, 13, 14, 10]   # each id stays with its key


def test_query_never_meets_its_own_image_in_the_negatives():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    state = cmid.MethodState(queue_size=12, key_dim=8, local_out=4, seed=0)
    ids = torch.tensor([7, 3, 9, 5])
    # the queue holds stale copies of images 3 and 7 (the queries themselves: the hardest negatives)
    state.enqueue(torch.cat([q[:2], q[:2] + 0.01, F.normalize(torch.randn(4, 8), dim=1)]),
                  torch.tensor([7, 3, 7, 3, 1, 2, 4, 6]))
    own = ids.view(-1, 1) == state.queue_ids.view(1, -1)
    loss = cmid.infonce_loss(q, k, state.queue, 0.2, own)
    ref = []
    for b in range(4):   # reference: each query's negatives are the queue rows of OTHER images only
        negs = state.queue[state.queue_ids != ids[b]]
        logits = torch.cat([(q[b] * k[b]).sum().view(1), negs @ q[b]]) / 0.2
        ref.append(-torch.log_softmax(logits, 0)[0])
    assert loss.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-6)
    assert loss < cmid.infonce_loss(q, k, state.queue, 0.2)          # the stale self-copies would dominate


def test_train_step_enqueues_image_ids_and_loader_ids_are_the_images(tmp_path):
    args = tiny_args()
    student, teacher, state, _ = one_step(args, batch=4)
    # one_step's ids are 10..13: the official order enqueues view 2's keys, then view 1's
    assert state.queue_ids[:8].tolist() == [10, 11, 12, 13] * 2 and (state.queue_ids[8:] == -1).all()
    loader = cmid.data.build_loader("synthetic", "", "train", size=32, batch_size=8, shuffle=True, drop_last=True,
                                    workers=0, synthetic_images=40)
    loader.sampler.set_epoch(3)
    seen = []
    for images, ids in cmid.batches_with_ids(loader):
        served = torch.stack([loader.dataset[int(loader.rows[i])] for i in ids])   # ids: positions in the split
        assert torch.equal(images, served)  # ids index the very images served
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) == 3 * 8


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
    assert {"encoder.backbone.cls_token", "encoder.backbone.pos_embed"} <= skipped
    assert "mask_token" not in skipped                                # decayed, as timm's optimiser factory does
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
        ids = torch.arange(10, 10 + batch)
        losses = cmid.train_step(student, teacher, state, optimizer, scaler, images, ids, aug, sched, s, args, device)
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
        for k in ("loss", "mim", "l1", "ffl", "global", "local", "lr", "step", "images_seen"):
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
    assert read_log(out)[0]["knn_floor"] == trained["random init"]["knn"]                 # one random-init floor
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
        out = head(torch.randn(4, 16, 9))
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
    feats = torch.randn(8, 32, 9)
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


def test_view2_noise_sigma_in_the_official_range():
    # A.GaussNoise(): variance U(10, 50) on uint8 -> sigma sqrt(10)/255 .. sqrt(50)/255 in [0,1] units
    torch.manual_seed(0)
    x = torch.full((400, 3, 64, 64), 0.5)                             # no clipping at 0.5
    sigma = (cmid.gauss_noise(x, p=1.0) - x).flatten(1).std(1)
    lo, hi = math.sqrt(10) / 255, math.sqrt(50) / 255
    assert sigma.min() > 0.97 * lo and sigma.max() < 1.03 * hi
    assert sigma.min() < 1.1 * lo and sigma.max() > 0.95 * hi       # the whole range is drawn
    var = (sigma * 255) ** 2                                          # variance uniform: mean 30
    assert var.mean().item() == pytest.approx(30, rel=0.05)
    applied = ((cmid.gauss_noise(x, p=0.6) - x).flatten(1).abs().amax(1) > 0).float().mean()
    assert applied.item() == pytest.approx(0.6, abs=0.08)


def test_view2_blur_sizes_and_kernel_are_the_official_ones():
    # albumentations 1.2.1 GaussianBlur.get_params: ksize = randrange(3, 8); an even ksize -> (ksize+1) % 8
    official = {}
    for k in range(3, 8):
        k = (k + 1) % 8 if k % 2 != 1 else k
        official[k] = official.get(k, 0) + 1 / 5
    torch.manual_seed(0)
    sizes, sigmas = cmid.blur_params(20000, "cpu")
    for k, p in official.items():
        assert (sizes == k).float().mean().item() == pytest.approx(p, abs=0.015)
    assert set(sizes.tolist()) == set(official) and sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    # the response to a centred impulse is cv2's kernel, getGaussianKernel(k, sigma) outer itself
    size, sigma = torch.tensor([3, 5, 7]), torch.tensor([0.8, 1.3, 2.0])
    x = torch.zeros(3, 3, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = cmid.gaussian_blur(x, size, sigma)
    for b in range(3):
        k, s = size[b].item(), sigma[b].item()
        g = torch.tensor([math.exp(-(i - (k - 1) / 2) ** 2 / (2 * s * s)) for i in range(k)])
        g = g / g.sum()
        ref = torch.zeros(15, 15)
        ref[7 - k // 2:8 + k // 2, 7 - k // 2:8 + k // 2] = torch.outer(g, g)
        assert torch.allclose(y[b, 0], ref, atol=1e-7) and torch.allclose(y[b, 2], ref, atol=1e-7)


def test_view2_solarise_gray_and_order():
    x = torch.tensor([0.2, 127 / 255, 128 / 255, 0.9]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert torch.allclose(cmid.solarize(x, p=1.0)[0, 0, 0], torch.tensor([0.2, 127 / 255, 127 / 255, 0.1]))
    rgb = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(cmid.to_gray(rgb, p=1.0), torch.full((1, 3, 1, 1), 0.299 + 0.5 * 0.587))
    # the official order is jitter, blur, noise, solarise, gray: a solarised-then-grayed image is gray
    args = tiny_args("--img-size", "64")
    torch.manual_seed(0)
    _, aug2 = cmid.build_views(args, torch.device("cpu"))
    v, params = aug2(torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8))
    raw = v * torch.tensor(cmid.CMID_STD).view(1, 3, 1, 1) + torch.tensor(cmid.CMID_MEAN).view(1, 3, 1, 1)
    gray = (raw[:, 0] - raw[:, 1]).abs().amax((1, 2)) < 1e-5
    assert 0.08 < gray.float().mean() < 0.35 and set(params) >= {"boxes", "hflip"}


def test_resnet_bottleneck_last_bn_starts_at_zero():
    # timm's resnet50 (the official backbone) zero-initialises each bottleneck's last BN weight
    net = cmid.ResNet50()
    blocks = [m for m in net.modules() if isinstance(m, cmid.Bottleneck)]
    assert len(blocks) == 16
    for blk in blocks:
        assert (blk.bn3.weight == 0).all() and (blk.bn1.weight == 1).all() and (blk.bn2.weight == 1).all()
        if blk.downsample is not None:
            assert (blk.downsample[1].weight == 1).all()
    assert (net.bn1.weight == 1).all()


def test_random_init_floor_bn_statistics_come_from_the_train_images():
    torch.manual_seed(0)
    net = cmid.ResNet50()
    images = [torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    loader = [(im, torch.zeros(6, dtype=torch.long)) for im in images]
    assert cmid.reestimate_bn(net, loader, torch.device("cpu")) and not net.training
    with torch.no_grad():   # cumulative average over the two batches of the stem's batch statistics
        stem = [net.conv1(cmid.data.normalize(im, cmid.CMID_MEAN, cmid.CMID_STD)) for im in images]
    mean = sum(s.mean((0, 2, 3)) for s in stem) / 2
    var = sum(s.var((0, 2, 3), unbiased=True) for s in stem) / 2
    assert torch.allclose(net.bn1.running_mean, mean, atol=1e-5) and torch.allclose(net.bn1.running_var, var, rtol=1e-4)
    assert not cmid.reestimate_bn(cmid.VisionTransformer(32, 16, 192, 1, 3), loader, torch.device("cpu"))


def test_local_centre_updates_twice_from_matched_teacher_outputs():
    # official LocalLoss.forward: loss with the current centre, then update_center(that teacher output)
    torch.manual_seed(0)
    s1, t2, s2, t1 = (torch.randn(3, 6, 4) for _ in range(4))
    state = cmid.MethodState(4, 2, 6, seed=0)
    state.centre.copy_(torch.randn(1, 6, 1))
    c0 = state.centre.clone()
    loss = cmid.local_loss(((s1, t2), (s2, t1)), state, 0.1, 0.05, 0.9)

    def ref_loss(s, t, c):
        return torch.sum(-F.softmax((t - c) / 0.05, dim=1) * F.log_softmax(s / 0.1, dim=1), dim=1).mean()
    c1 = 0.9 * c0 + 0.1 * t2.sum((0, 2), keepdim=True) / (3 * 4)
    c2 = 0.9 * c1 + 0.1 * t1.sum((0, 2), keepdim=True) / (3 * 4)
    assert loss.item() == pytest.approx(((ref_loss(s1, t2, c0) + ref_loss(s2, t1, c1)) / 2).item(), rel=1e-6)
    assert torch.allclose(state.centre, c2, atol=1e-7)
