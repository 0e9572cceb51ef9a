"""Tests of gsc_mim.py (CPU, tiny): IPC-Masking, losses against hand-written formulas, centring,
EMA, schedules, overfitting, exact resume, 2-process torchrun, export names, --eval-only."""
import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gsc_mim", REPO / "gsc_mim.py")
gsc = importlib.util.module_from_spec(spec)
sys.modules["gsc_mim"] = gsc
spec.loader.exec_module(gsc)
gsc.ARCHS.setdefault("vit_micro", (32, 2, 2))  # a 2-block ViT for the in-process tests

# Script runs: ViT-Tiny at 32 px (2x2 patches of 16), small head, 40 synthetic images (30 train).
TINY = ["--data", "synthetic", "--synthetic-images", "40", "--arch", "vit_tiny", "--img-size", "32",
        "--patch-size", "16", "--batch-size", "8", "--out-dim", "64", "--head-hidden", "64",
        "--workers", "0", "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "2", "--log-every", "1"]


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
def test_ipc_masks_are_complementary(shape):
    rng = np.random.RandomState(0)
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
    B, N = 400, 16
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
    out = gsc.train_step(run, torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8), 0, 0)
    assert out["loss_mim"].item() == 0.0 and out["loss"].item() == out["loss_cls"].item()  # plain iBOT-style


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_on_cpu(amp):
    """The mixed-precision paths (dtype mixing in e[MASK]/pos-embed, head, losses; the fp16 scaler on
    the run's device) run on the CPU too."""
    args = micro_args(amp=amp, batch_size=4, epochs=1, local_crops=1, local_crop_size=16)
    gsc.setup_distributed(args)
    run = gsc.build_run(args, 4)
    out = gsc.train_step(run, torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8), 0, 1)
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
    out = gsc.train_step(run, torch.zeros(4, 3, 36, 36, dtype=torch.uint8), 0, 0)
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
    losses = [gsc.train_step(run, images, i, 0)["loss"].item() for i in range(30)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


# ---------------------------------------------------------------- script runs ---------------------
def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_exact_resume(tmp_path):
    """The shared tiny recipe, run in-process (same code path as the command line, no start-up cost)."""
    a, b = tmp_path / "a", tmp_path / "b"
    gsc.main([*TINY, "--epochs", "2", "--out", str(a), "--no-eval"])
    # 30 train images / 8 = 3 steps per epoch: stop after step 2 of epoch 2, resume in the same folder
    gsc.main([*TINY, "--epochs", "2", "--out", str(b), "--no-eval", "--max-steps", "5"])
    assert len(read_log(b)) == 1
    gsc.main([*TINY, "--epochs", "2", "--out", str(b), "--no-eval", "--resume", "auto"])
    la, lb = read_log(a), read_log(b)
    assert len(la) == len(lb) == 2
    for key in ("loss", "loss_cls", "loss_mim"):
        assert la[0][key] == lb[0][key] and la[1][key] == lb[1][key], (key, la, lb)


def test_torchrun_two_processes_exact_resume(run_torchrun, tmp_path):
    """2-process gloo run, and the resume recipe under DDP: every rank must get back its own RNG
    streams and loss sums (the checkpoint is written by rank 0 alone)."""
    a, b = tmp_path / "a", tmp_path / "b"
    ddp = [*TINY, "--batch-size", "4", "--epochs", "2", "--no-eval"]
    proc = run_torchrun(2, "gsc_mim.py", *ddp, "--out", a)
    assert proc.stdout.count("epoch 0 step 3/3") == 1  # rank 0 alone prints; 30 images / 2 ranks / 4
    run_torchrun(2, "gsc_mim.py", *ddp, "--out", b, "--max-steps", "4")  # stops after step 1 of epoch 2
    run_torchrun(2, "gsc_mim.py", *ddp, "--out", b, "--resume", "auto")
    la, lb = read_log(a), read_log(b)
    assert len(la) == len(lb) == 2 and math.isfinite(la[1]["loss"])
    for key in ("loss", "loss_cls", "loss_mim"):
        assert la[1][key] == pytest.approx(lb[1][key], rel=1e-6, abs=1e-7), (key, la, lb)


def test_export_eval_only_visualize(tmp_path, capsys, monkeypatch):
    args = micro_args(out=tmp_path)
    student, teacher = gsc.build_student_teacher(args)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "args": {k: v for k, v in vars(args).items()}}, ckpt)
    with monkeypatch.context() as m:  # under torchrun, ranks other than 0 write nothing
        m.setenv("RANK", "1")
        gsc.main(["--export", str(ckpt), "--out", str(tmp_path)])
    assert not (tmp_path / "backbone.pth").exists()
    gsc.main(["--export", str(ckpt), "--out", str(tmp_path)])
    sd = torch.load(tmp_path / "backbone.pth")
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(2):
        expected += [f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")]
    expected += ["norm.weight", "norm.bias"]
    assert sorted(sd) == sorted(expected)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], teacher.backbone.blocks[1].attn.qkv.weight)
    capsys.readouterr()
    gsc.main(["--eval-only", str(ckpt), "--data", "synthetic", "--synthetic-images", "40", "--batch-size", "16",
              "--workers", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for word in ("linear@1%", "linear@100%", "knn", "random_init"):
        assert word in out
    gsc.main(["--visualize", str(ckpt), "--data", "synthetic", "--synthetic-images", "40", "--out", str(tmp_path)])
    from PIL import Image
    assert Image.open(tmp_path / "visualize.png").size == (5 * 32, 6 * 32)  # 5 columns, 6 images
    res = json.loads((tmp_path / "eval.json").read_text())
    assert set(res) == {"gsc_mim", "random_init"}
    assert all(0 <= v <= 100 for r in res.values() for v in r.values())


def test_vit_through_the_triton_kernel_matches_sdpa(triton_attention, assert_models_agree):
    """--attn triton through the kernel itself (interpreter on the CPU, compiled on a GPU): the
    script's ViT (with e[MASK] tokens) has the same output and parameter gradients as with SDPA."""
    torch.manual_seed(0)
    a, b = (gsc.VisionTransformer("vit_tiny", 16, 32, attn=attn).to(triton_attention) for attn in ("sdpa", "triton"))
    x = torch.randn(2, 3, 32, 32, device=triton_attention)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]], device=triton_attention)
    assert_models_agree(a, b, lambda m: (m(x, mask),))
