"""Tests of gsc_mim.py (CPU, tiny): IPC-Masking, losses against hand-written formulas, centring,
EMA, schedules, overfitting, exact resume (signal, --max-steps), kNN during training, 2-process and
two-node torchrun, the checkpoint modes (--export, --visualize, --eval-only), user errors, same/cross IPC views."""
import copy
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gsc_mim", REPO / "gsc_mim.py")
gsc = importlib.util.module_from_spec(spec)
sys.modules["gsc_mim"] = gsc
spec.loader.exec_module(gsc)
gsc.ARCHS.setdefault("vit_micro", (32, 2, 2))  # a 2-block ViT for the in-process tests

# Script runs: ViT-Tiny at 32 px (2x2 patches of 16), small head, 40 synthetic images (30 train).
TINY = ["--data", "synthetic", "--synthetic-images", "40", "--arch", "vit_tiny", "--img-size", "32",
        "--patch-size", "16", "--batch-size", "8", "--out-dim", "64", "--head-hidden", "64",
        "--workers", "0", "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "2", "--log-every", "1",
        "--cache", "none"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: one intra-op thread is ~10x faster than two fighting for them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def micro_args(**kw):
    a = ["--data", "synthetic", "--arch", "vit_micro", "--img-size", "32", "--patch-size", "8",
         "--out-dim", "32", "--head-hidden", "32", "--synthetic-images", "40", "--workers", "0"]
    for k, v in kw.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return gsc.resolve_defaults(gsc.get_args_parser().parse_args(a))


# ---------------------------------------------------------------- IPC-Masking ---------------------
@pytest.mark.parametrize("shape", ["block", "rand"])
@pytest.mark.parametrize("rng", [np.random.RandomState(0), np.random.default_rng(0)], ids=["RandomState", "Generator"])
def test_ipc_masks_are_complementary(shape, rng):
    m1, m2 = gsc.ipc_masks(400, 14, 14, clean_prob=0.5, ratio_range=(0.1, 0.5), shape=shape, rng=rng)
    clean = ~m1.any(1) & ~m2.any(1)
    assert 0.4 < clean.mean() < 0.6  # "ratio 0 with probability 0.5"
    # every grid position is masked in exactly one of the two student views
    assert (m1[~clean] ^ m2[~clean]).all() and not (m1 & m2).any()
    # the mask m has ratio in [0.1, 0.5]: the less-masked view of each pair
    r = m1.sum(1)[~clean] / 196
    r = np.minimum(r, 1 - r)
    assert r.max() <= 0.5 + 1e-9 and 0.2 < r.mean() < 0.35  # r ~ U[0.1, 0.5] (blocks may undershoot)
    assert 0.3 < (m1[~clean].sum(1) < 98).mean() < 0.7  # roles of s1 / s2 swapped at random


def test_same_views_are_complementary_masks_of_one_crop():
    """--ipc-views same: per masked image both students are made from ONE crop (rows of [t1; t2]),
    under exact complements, so their masked positions together cover every patch of it; which
    crop is drawn per image (both about equally often); the [CLS] partner is the other crop."""
    rng = np.random.RandomState(5)
    B = 400
    m1, m2 = gsc.ipc_masks(B, 4, 4, clean_prob=0.5, ratio_range=(0.1, 0.5), rng=rng)
    rows, partner = gsc.student_view_rows(m1, m2, "same", rng)
    crop, image = rows // B, rows % B
    assert (image == np.tile(np.arange(B), 2)).all() and (partner == (1 - crop) * B + image).all()
    masked = (m1 | m2).any(1)
    assert (crop[:B][masked] == crop[B:][masked]).all()  # s1, s2 of one crop
    assert (m1[masked] == ~m2[masked]).all()  # exact complements: every patch masked in one view
    assert 0.4 < crop[:B][masked].mean() < 0.6  # t1 / t2 drawn per image
    assert (crop[:B][~masked] == 0).all() and (crop[B:][~masked] == 1).all()  # clean pairs: t1, t2
    rows, partner = gsc.student_view_rows(m1, m2, "cross", rng)
    assert (rows == np.arange(2 * B)).all() and (partner == np.roll(np.arange(2 * B), B)).all()


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_block_mask_ratio_on_14x14(ratio):
    rng = np.random.RandomState(1)
    m = gsc.block_mask(np.full(300, ratio), 14, 14, rng)
    achieved = m.sum(1) / 196
    assert abs(achieved.mean() - ratio) <= 0.05, achieved.mean()
    assert (m.sum(1) <= ratio * 196 + 1e-9).all()  # never above the target


def test_random_mask_exact_count():
    ratios = np.array([0.1, 0.25, 0.5, 0.0])
    m = gsc.random_mask(ratios, 196, np.random.RandomState(2))
    assert m.sum(1).tolist() == [round(r * 196) for r in ratios]


# ---------------------------------------------------------------- losses --------------------------
def ce_by_hand(t, s, c, tt, ts):
    """-sum_k softmax((t - c)/tt)_k * log_softmax(s/ts)_k, written out."""
    pt = np.exp((t - c) / tt - ((t - c) / tt).max())
    pt /= pt.sum()
    ls = s / ts - (s / ts).max()
    ls = ls - math.log(np.exp(ls).sum())
    return -(pt * ls).sum()


def test_patch_mim_loss_matches_formula():
    g = np.random.RandomState(3)
    V, B, N, K, tt, ts = 2, 3, 5, 7, 0.05, 0.1
    s, t, c = g.randn(V, B, N, K), g.randn(V, B, N, K), g.randn(K) * 0.1
    masks = g.rand(V, B, N) < 0.5
    masks[0, 1] = False  # an image with no masked position contributes 0
    expected = 0.0
    for v in range(V):
        per_image = []
        for b in range(B):
            terms = [ce_by_hand(t[v, b, i], s[v, b, i], c, tt, ts) for i in range(N) if masks[v, b, i]]
            per_image.append(sum(terms) / max(1, len(terms)))
        expected += np.mean(per_image) / V
    index, weight = gsc.masked_token_index(masks.reshape(V * B, N))
    flat = lambda x: torch.tensor(x.reshape(V * B * N, K), dtype=torch.float32)[index]  # noqa: E731
    got = gsc.patch_mim_loss(flat(s), flat(t), weight, B, torch.tensor(c, dtype=torch.float32), tt, ts)
    assert abs(got.item() - expected) < 1e-4 * max(1, abs(expected))


def test_cls_distillation_loss_matches_formula():
    g = np.random.RandomState(4)
    B, K, tt, ts = 2, 6, 0.04, 0.1
    s = g.randn(4 * B, K)  # s1, s2, two local crops
    t = g.randn(2 * B, K)  # t1, t2
    c = g.randn(K) * 0.1
    sv, tv = np.split(s, 4), np.split(t, 2)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # (teacher view, student view), cross-view
    expected = np.mean([np.mean([ce_by_hand(tv[q][b], sv[v][b], c, tt, ts) for b in range(B)]) for q, v in pairs])
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    cross = torch.tensor([2, 3, 0, 1])  # s1 <- t2, s2 <- t1
    got = gsc.cls_distillation_loss(f(s), f(t), cross, f(c)[None], tt, ts)
    assert abs(got.item() - expected) < 1e-4 * max(1, abs(expected))
    # same: image 0's students both saw t1 (partner t2), image 1's both saw t2 (partner t1)
    terms = [ce_by_hand(t[q], s[r], c, tt, ts) for r, q in enumerate([2, 1, 2, 1])]
    terms += [ce_by_hand(tv[q][b], sv[v][b], c, tt, ts) for q in (0, 1) for v in (2, 3) for b in range(B)]
    got = gsc.cls_distillation_loss(f(s), f(t), torch.tensor([2, 1, 2, 1]), f(c)[None], tt, ts)
    assert abs(got.item() - np.mean(terms)) < 1e-4 * max(1, abs(np.mean(terms)))


def test_centres_update():
    K, m = 4, 0.9
    cc, cp = torch.ones(1, K), torch.full((1, 1, K), 2.0)
    t_cls, t_patch = torch.arange(12.0).reshape(3, K), torch.arange(8.0).reshape(2, K)
    gsc.update_centers(cc, cp, t_cls, t_patch, m)
    assert torch.allclose(cc, m * 1 + (1 - m) * t_cls.mean(0, keepdim=True))
    assert torch.allclose(cp, m * 2 + (1 - m) * t_patch.mean(0).view(1, 1, K))
    before = cp.clone()
    gsc.update_centers(cc, cp, t_cls, torch.zeros(0, K), m)  # no masked token: patch centre kept
    assert torch.equal(cp, before)


def test_ema_update_and_teacher():
    student, teacher = gsc.build_student_teacher(micro_args())
    assert teacher.backbone.mask_token is None and student.backbone.mask_token is not None
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    s = dict(student.named_parameters())
    gsc.ema_update(student, teacher, 0.9)
    for n, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * s[n]), n


def test_initial_weights_do_not_depend_on_the_rank_seed():
    """DDP syncs only the student: the teacher (a copy made before the sync) must start equal on
    every rank although each rank seeds its RNG with seed + rank."""
    args = micro_args()
    args.rank, args.world_size, args.device = 0, 1, torch.device("cpu")
    runs = []
    for rank_seed in (0, 1):
        torch.manual_seed(rank_seed)
        runs.append(gsc.build_run(args, 2))
    for name in ("student", "teacher"):
        a, b = (getattr(r, name).state_dict() for r in runs)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_per_parameter_clip():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    gsc.clip_gradients(torch.nn.ParameterList([a, b]), 3.0)
    assert torch.allclose(a.grad.norm(), torch.tensor(3.0)) and torch.allclose(b.grad, torch.tensor([0.3, 0.4]))


def test_schedules():
    tt = gsc.teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(tt) == 100 and tt[0] == pytest.approx(0.04) and tt[29] == pytest.approx(0.07)
    assert tt[15] == pytest.approx(0.04 + 0.03 * 15 / 29) and (tt[30:] == 0.07).all()
    lr = gsc.cosine_schedule(1e-3, 1e-6, 20, 5, warmup_epochs=10)
    assert len(lr) == 100 and lr[0] == 0 and lr[50] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-6, abs=2e-6)
    assert np.all(np.diff(lr[:50]) > 0) and np.all(np.diff(lr[50:]) <= 0)
    mom = gsc.cosine_schedule(0.996, 1.0, 10, 10)
    assert mom[0] == pytest.approx(0.996) and mom[-1] == pytest.approx(1.0, abs=1e-5)
    wd = gsc.cosine_schedule(0.04, 0.4, 10, 10)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-4)


def test_weight_norm_last_layer_and_groups():
    args = micro_args(norm_last_layer="true")
    student, _ = gsc.build_student_teacher(args)
    ll = student.head.last_layer
    assert not ll.weight_g.requires_grad
    w = ll.weight_v * (ll.weight_g / ll.weight_v.norm(dim=1))[:, None]
    assert torch.allclose(w.norm(dim=1), torch.ones(len(w)))
    decay, no_decay = gsc.param_groups(student)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert all(p is not ll.weight_g for g in (decay, no_decay) for p in g["params"])  # frozen norms
    student, _ = gsc.build_student_teacher(micro_args(norm_last_layer="false"))
    decay, no_decay = gsc.param_groups(student)  # DINO/iBOT decay their (K, 1) weight_g
    g = student.head.last_layer.weight_g
    assert any(p is g for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or "norm" in names[id(p)] for p in no_decay["params"])


def test_mask_embedding_replaces_patches_and_clean_prob_one():
    args = micro_args(clean_prob=1.0, batch_size=4, epochs=1)
    student, _ = gsc.build_student_teacher(args)
    vit = student.backbone
    with torch.no_grad():
        vit.mask_token.fill_(0.5)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = mask[1, :8] = True
    tok = vit.prepare_tokens(x, mask)
    pos = vit.pos_embed[0, 1:]
    assert torch.allclose(tok[0, 1 + 3], 0.5 + pos[3]) and torch.allclose(tok[1, 1:9], 0.5 + pos[:8])
    assert torch.allclose(tok[0, 1 + 4], vit.prepare_tokens(x)[0, 1 + 4])  # visible: untouched
    gsc.setup_distributed(args)
    run = gsc.build_run(args, 4)
    masks = gsc.ipc_batch(np.random.default_rng(0), 4, args)
    assert not masks[0].any() and len(masks[1]) == 0  # clean_prob 1: no masked position, no patch token
    out = gsc.train_step(run, torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8), masks, 0, 0)
    assert out["loss_mim"].item() == 0.0 and out["loss"].item() == out["loss_cls"].item()  # plain iBOT-style


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_on_cpu(amp):
    """The mixed-precision paths (dtype mixing in e[MASK]/pos-embed, head, losses; the fp16 scaler on
    the run's device) run on the CPU too."""
    args = micro_args(amp=amp, batch_size=4, epochs=1, local_crops=1, local_crop_size=16)
    gsc.setup_distributed(args)
    run = gsc.build_run(args, 4)
    masks = gsc.ipc_batch(np.random.default_rng(0), 4, args)
    out = gsc.train_step(run, torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8), masks, 0, 1)
    assert all(math.isfinite(v.item()) for v in out.values())
    assert run.scaler.is_enabled() == (amp == "fp16")


def soft_ce_by_hand(t, s, c, tt, ts):
    return -(torch.softmax((t - c) / tt, -1) * torch.log_softmax(s / ts, -1)).sum(-1)


@pytest.mark.parametrize("ipc_views", ["same", "cross"])
def test_step_losses_match_a_transcription(ipc_views, monkeypatch):
    """train_step's losses on a tiny model against a transcription that runs every network on whole
    images: the patch loss compares each student token with the teacher's token at the SAME
    position of the SAME crop the student was made from (same: one crop per image for s1 and s2;
    cross: t1 for s1, t2 for s2); the [CLS] loss pairs it with the teacher's other crop."""
    args = micro_args(ipc_views=ipc_views, batch_size=4, epochs=1, drop_path=0.0)
    gsc.setup_distributed(args)
    run = gsc.build_run(args, 4)
    g = torch.Generator().manual_seed(6)
    t12 = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    run.aug_t1, run.aug_t2 = (lambda im: (t12[0], None)), (lambda im: (t12[1], None))
    m1 = torch.rand(4, 16, generator=g).numpy() < 0.3
    m1[2] = False  # a clean pair
    m2 = ~m1
    m2[2] = False
    monkeypatch.setattr(gsc, "ipc_masks", lambda *a, **k: (m1, m2))
    seen = []
    real_rows = gsc.student_view_rows
    monkeypatch.setattr(gsc, "student_view_rows", lambda *a: seen.append(real_rows(*a)) or seen[-1])
    student, teacher = copy.deepcopy(run.student), copy.deepcopy(run.teacher)
    with torch.no_grad():
        run.center_cls.normal_(0, 0.1), run.center_patch.normal_(0, 0.1)
    cc, cp = run.center_cls.clone(), run.center_patch.clone()
    masks = gsc.ipc_batch(np.random.default_rng(0), 4, args)  # built as the loader does
    out = gsc.train_step(run, torch.zeros(4, 3, 36, 36, dtype=torch.uint8), masks, 0, 0)
    rows = seen[0][0]
    crop = rows // 4
    if ipc_views == "cross":
        assert (crop == [0, 0, 0, 0, 1, 1, 1, 1]).all()
    else:
        assert crop[2] == 0 and crop[6] == 1 and all(crop[b] == crop[4 + b] for b in (0, 1, 3))
    tt, ts = run.teacher_temp[0], args.student_temp
    with torch.no_grad():
        t_tok = [teacher.head(teacher.backbone(t)) for t in t12]  # [B, 1 + N, K] per crop
        mim, cls = [], []
        for j, m in enumerate((m1, m2)):
            for b in range(4):
                x = t12[crop[4 * j + b]][b:b + 1]
                s_tok = student.head(student.backbone(x, torch.from_numpy(m[b:b + 1])))[0]
                own, other = t_tok[crop[4 * j + b]][b], t_tok[1 - crop[4 * j + b]][b]
                i = np.flatnonzero(m[b]) + 1
                mim.append(soft_ce_by_hand(own[i], s_tok[i], cp[0, 0], tt, ts).mean() if len(i) else torch.tensor(0.0))
                cls.append(soft_ce_by_hand(other[0], s_tok[0], cc[0], tt, ts))
    assert out["loss_mim"].item() == pytest.approx(torch.stack(mim).mean().item(), rel=1e-4)
    assert out["loss_cls"].item() == pytest.approx(torch.stack(cls).mean().item(), rel=1e-4)


def test_loss_falls_when_overfitting_one_batch():
    args = micro_args(epochs=1, batch_size=8, lr=1e-3, clean_prob=0.0, freeze_last_layer=0,
                      warmup_epochs=0, drop_path=0.0, local_crops=2, local_crop_size=16)
    gsc.setup_distributed(args)
    run = gsc.build_run(args, 40)
    images = torch.randint(0, 256, (8, 3, 36, 36), dtype=torch.uint8)
    losses = [gsc.train_step(run, images, gsc.ipc_batch(np.random.default_rng(i), 8, args), i, 0)["loss"].item()
              for i in range(30)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


# ---------------------------------------------------------------- script runs ---------------------
def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def step_lines(text):
    """The per-step log lines up to the loss terms (the lr, speed and eta after them vary)."""
    return [line.split(" lr ")[0] for line in text.splitlines() if line.startswith("epoch ") and " loss " in line]


def test_exact_resume_after_a_signal_and_max_steps_with_knn(tmp_path, capsys, monkeypatch):
    """An uninterrupted run vs the same run stopped by SIGUSR1 mid-epoch 0 and by --max-steps
    mid-epoch 1, resumed each time with --resume auto: the same per-step losses and the same log -
    kNN entries at the requested epochs, none twice - so neither the save points nor the
    evaluations touch the random streams."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*TINY, "--epochs", "3", "--eval-every", "2", "--no-eval"]  # 30 train images / 8: 3 steps an epoch
    gsc.main([*flags, "--out", str(a)])
    uninterrupted = step_lines(capsys.readouterr().out)
    train_step = gsc.train_step

    def signalled(run, images, masks, step, epoch):  # the signal arrives during the second step
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(run, images, masks, step, epoch)
    monkeypatch.setattr(gsc, "train_step", signalled)
    gsc.main([*flags, "--out", str(b)])
    monkeypatch.setattr(gsc, "train_step", train_step)
    first = capsys.readouterr().out
    assert "preempted (SIGUSR1): checkpoint" in first and "at epoch 0 step 2; resume with" in first
    gsc.main([*flags, "--out", str(b), "--resume", "auto", "--max-steps", "5"])
    second = capsys.readouterr().out
    gsc.main([*flags, "--out", str(b), "--resume", "auto"])
    third = capsys.readouterr().out
    assert "resumed from epoch 0 step 2" in second and "resumed from epoch 1 step 2" in third
    assert step_lines(first + second + third) == uninterrupted and len(uninterrupted) == 9
    untimed = [[{k: v for k, v in r.items() if k != "time_s"} for r in read_log(out)] for out in (a, b)]
    assert untimed[0] == untimed[1]
    assert [r["epoch"] for r in untimed[1] if "knn" in r] == [1, 2]  # every 2nd epoch and the last
    assert sum("knn_floor" in r for r in untimed[1]) == 1 and [r["epoch"] for r in untimed[1] if "loss" in r] == [0, 1, 2]
    assert Image.open(b / "curves.png").format == "PNG"


def test_resume_never_hands_a_device_rng_state_to_set_rng_state(tmp_path, monkeypatch):
    """--resume on CUDA crashed in torch.set_rng_state: torch.load(map_location=<the GPU>) had moved
    the saved RNG ByteTensors there. Stand-in without a GPU: a load with any map_location but "cpu"
    puts them on the meta device; the resume must still set CPU states only."""
    flags = [*TINY, "--epochs", "1", "--eval-every", "0", "--no-eval", "--out", str(tmp_path)]
    gsc.main([*flags, "--max-steps", "2"])
    load, set_rng_state, seen = torch.load, torch.set_rng_state, []

    def mapped_load(f, map_location=None, **kw):
        ckpt = load(f, map_location="cpu", **kw)
        if map_location != "cpu":
            for r in ckpt["ranks"]:
                r["rng"]["torch"] = r["rng"]["torch"].to("meta")
        return ckpt

    def checked_set_rng_state(state):
        seen.append(state.device.type)
        set_rng_state(state)
    monkeypatch.setattr(torch, "load", mapped_load)
    monkeypatch.setattr(torch, "set_rng_state", checked_set_rng_state)
    gsc.main([*flags, "--resume", "auto"])
    assert seen and set(seen) == {"cpu"}
    for other, match in ((["--split-seed", "1"], "same data and split"), (["--arch", "vit_small"], "--arch vit_tiny")):
        with pytest.raises(data.UserError, match=match):  # another split or model is not a resume
            gsc.main([*flags, "--resume", "auto", *other])


def test_torchrun_two_processes_exact_resume(run_torchrun, tmp_path):
    """2-process gloo run with the kNN evaluation on rank 0 (the other rank waits: no deadlock), and
    the resume recipe under DDP: every rank must get back its own RNG streams and loss sums."""
    a, b = tmp_path / "a", tmp_path / "b"
    ddp = [*TINY, "--batch-size", "4", "--epochs", "2", "--no-eval", "--eval-every", "1"]
    proc = run_torchrun(2, "gsc_mim.py", *ddp, "--out", a)
    assert proc.stdout.count("epoch 0 step 3/3") == 1  # rank 0 alone prints; 30 images / 2 ranks / 4
    assert "Grad strides do not match bucket view strides" not in proc.stderr
    run_torchrun(2, "gsc_mim.py", *ddp, "--out", b, "--max-steps", "4")  # stops after step 1 of epoch 2
    run_torchrun(2, "gsc_mim.py", *ddp, "--out", b, "--resume", "auto")
    la, lb = read_log(a), read_log(b)
    assert [r["epoch"] for r in la if "knn" in r] == [r["epoch"] for r in lb if "knn" in r] == [0, 1]
    la, lb = [r for r in la if "loss" in r], [r for r in lb if "loss" in r]
    assert len(la) == len(lb) == 2 and math.isfinite(la[1]["loss"])
    for key in ("loss", "loss_cls", "loss_mim"):
        assert la[1][key] == pytest.approx(lb[1][key], rel=1e-6, abs=1e-7), (key, la, lb)


def test_two_nodes_train_identically_and_resume(tmp_path):
    """Two torchrun "nodes" of one process each on this host (c10d rendezvous, gloo; both LOCAL_RANK
    0): identical parameters on both ranks after two steps, one checkpoint, and --resume auto on
    the same two nodes continues from it."""
    flags = [*TINY, "--batch-size", "4", "--epochs", "2", "--no-eval", "--eval-every", "0", "--out", str(tmp_path)]

    def two_nodes(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex,
               str(REPO / "tests" / "gsc_ddp_probe.py"), *flags, *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [node.communicate(timeout=240) for node in nodes]
        assert all(node.returncode == 0 for node in nodes), outs
        text = "".join(out for out, _ in outs)
        sums = {line.split()[1]: line.split()[-1] for line in text.splitlines() if " checksum " in line}
        assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], text
        return text, sums["0"]

    start = time.time()
    first, after_two = two_nodes("--max-steps", "2")
    assert (tmp_path / "checkpoint.pth").is_file() and "at epoch 0 step 2" in first
    second, after_four = two_nodes("--max-steps", "4", "--resume", "auto")
    assert "resumed from epoch 0 step 2" in second and "epoch 1 step 1/3" in second and after_four != after_two
    print(f"two-node test: {time.time() - start:.1f} s")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo (no --data), shrunk by explicit flags, with --seed 3 into a folder that is not the
    default OUT; returns (OUT, its eval.json, its splits.json)."""
    out = tmp_path_factory.mktemp("demo") / "my_run"
    gsc.main([*TINY[2:], "--epochs", "2", "--seed", "3", "--eval-every", "1", "--out", str(out)])
    return out, json.loads((out / "eval.json").read_text()), (out / "splits.json").read_text()


def test_demo_ends_with_its_picture(demo_run):
    assert Image.open(demo_run[0] / "visualize.png").size == (5 * 32, 6 * 32)  # 5 columns, 6 images


def test_export_beside_the_checkpoint_with_timm_names(demo_run, tmp_path, monkeypatch):
    ckpt = demo_run[0] / "checkpoint.pth"
    monkeypatch.chdir(tmp_path)  # where the default OUT (runs/...) would appear
    with monkeypatch.context() as m:  # under torchrun, ranks other than 0 write nothing
        m.setenv("RANK", "1")
        gsc.main(["--export", str(ckpt), "--out", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()
    gsc.main(["--export", str(ckpt)])
    assert not (tmp_path / "runs").exists()
    sd = torch.load(demo_run[0] / "backbone.pth")
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(12):  # vit_tiny
        expected += [f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")]
    assert sorted(sd) == sorted(expected)
    teacher = torch.load(ckpt, weights_only=False)["teacher"]
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], teacher["backbone.blocks.1.attn.qkv.weight"])


def test_visualize_beside_the_checkpoint(demo_run, tmp_path, monkeypatch):
    (demo_run[0] / "visualize.png").unlink()
    monkeypatch.chdir(tmp_path)
    gsc.main(["--visualize", str(demo_run[0] / "checkpoint.pth")])
    assert Image.open(demo_run[0] / "visualize.png").size == (5 * 32, 6 * 32) and not (tmp_path / "runs").exists()


def test_eval_only_beside_the_checkpoint_on_its_split(demo_run, tmp_path, monkeypatch, capsys):
    """--eval-only with another --seed: the run's split (its --split-seed, not --seed) and the same
    numbers as the run's own final evaluation; curves.png from its log.jsonl."""
    out, evaluated, splits = demo_run
    for name in ("eval.json", "splits.json", "curves.png"):
        (out / name).unlink()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    gsc.main(["--eval-only", str(out / "checkpoint.pth"), "--seed", "5"])
    assert (out / "splits.json").read_text() == splits and not (tmp_path / "runs").exists()
    res = json.loads((out / "eval.json").read_text())
    assert res == evaluated and all(0 <= v <= 100 for r in res.values() for v in r.values())
    assert Image.open(out / "curves.png").format == "PNG"
    printed = capsys.readouterr().out
    for word in ("linear@1%", "linear@100%", "knn", "random_init", "time to accuracy:"):
        assert word in printed


@pytest.mark.parametrize("flags", [["--split-seed", "7"], ["--data", "UCM"], ["--synthetic-images", "60"]])
def test_checkpoint_modes_refuse_another_dataset_or_split(demo_run, flags):
    with pytest.raises(data.UserError, match=f"{flags[0]} {flags[1]} differs from the checkpoint's"):
        gsc.main(["--eval-only", str(demo_run[0] / "checkpoint.pth"), *flags])


@pytest.mark.parametrize("case", ["missing data root", "unknown dataset", "foreign checkpoint", "non-finite loss"])
def test_user_errors_are_one_line_and_exit_2(case, tmp_path):
    foreign = tmp_path / "other.pth"
    torch.save({"args": {"arch": "vit_base"}, "model": {}}, foreign)
    argv = {"missing data root": ["--data", "UCM", "--data-root", str(tmp_path / "nowhere")],
            "unknown dataset": ["--data", "NoSuchSet"],
            "foreign checkpoint": ["--eval-only", str(foreign)],
            "non-finite loss": [*TINY, "--lr", "1e30", "--epochs", "1", "--eval-every", "0", "--out", str(tmp_path)]}
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "gsc_mim.py"), *argv[case]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_vit_through_the_triton_kernel_matches_sdpa(triton_attention, assert_models_agree):
    """--attn triton through the kernel itself (interpreter on the CPU, compiled on a GPU): the
    script's ViT (with e[MASK] tokens) has the same output and parameter gradients as with SDPA."""
    torch.manual_seed(0)
    a, b = (gsc.VisionTransformer("vit_tiny", 16, 32, attn=attn).to(triton_attention) for attn in ("sdpa", "triton"))
    x = torch.randn(2, 3, 32, 32, device=triton_attention)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]], device=triton_attention)
    assert_models_agree(a, b, lambda m: (m(x, mask),))
