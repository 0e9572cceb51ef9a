r"""GSC-MIM: self-distilled complementary masked image modelling for remote-sensing scenes.

Paper: "GSC-MIM: Global semantic integrated self-distilled complementary masked image model for
remote sensing images scene classification", Front. Ecol. Evol., Dec 2022. No official code
exists: this file is the reference implementation; where the paper is silent it follows iBOT.

A student ViT sees two views of an image under complementary masks (IPC-Masking, ipc_masks: s1
masks m, s2 masks 1 - m; both clean with probability 0.5) and predicts, at its masked positions,
the EMA teacher's head output for the same view unmasked (patch_mim_loss); a cross-view [CLS]
distillation (cls_distillation_loss) adds global semantics. Teacher = EMA of the student
(ema_update), centring and temperature schedules as in DINO/iBOT. Read top to bottom: args ->
model -> IPC-Masking -> losses -> teacher/EMA -> schedules -> train -> evaluate -> visualize ->
bench -> main.

--ipc-views same (default; paper sec. 1, 2.2): one crop per image under m and 1 - m, so the two
students together reconstruct every patch of it; [CLS] loss against the teacher's other crop.
--ipc-views cross (ablation): m and 1 - m on two different crops.

Choices where the paper is silent (iBOT's unless said):
- only [CLS] and masked tokens go through the 8192-way head; the patch centre is the EMA over them;
- weight decay 0.04 -> 0.4 (the paper's "0.004" read as a typo); per-parameter clip 3.0;
- teacher temperature per epoch, the same for [CLS] and patches.

Launch:
    python gsc_mim.py                                   # CPU demo: synthetic, ViT-Tiny, 64 px
    python gsc_mim.py --data UCM --data-root ../shared/data          # paper: ViT-S/16, 224 px, 300 ep
    python gsc_mim.py --data UCM --data-root ../shared/data --clean-prob 1   # iBOT-style ablation
    python gsc_mim.py --data UCM --data-root ../shared/data --resume auto    # continue OUT/checkpoint.pth
    torchrun --standalone --nproc_per_node=8 gsc_mim.py --data AID --data-root /datasets
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=run1 gsc_mim.py --data AID --data-root /datasets --resume auto    # on each node
    python gsc_mim.py --bench 20 --data synthetic --arch vit_small --batch-size 128
    python gsc_mim.py --eval-only runs/gsc_mim_UCM/checkpoint.pth   # also --export, --visualize
--eval-only, --export and --visualize take data, split and model from the checkpoint and write
beside it (eval.json, backbone.pth, visualize.png), or into --out.
"""
import argparse
import copy
from collections import OrderedDict
import datetime
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402  (the repo's data.py: datasets, loaders, GPU batch augmentation)

ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
         "vit_large": (1024, 24, 16)}  # name -> (width, depth, heads)


def get_args_parser():
    p = argparse.ArgumentParser("GSC-MIM", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="AID | NWPU-RESISC45 | UCM | synthetic | folder-per-class "
                   "path. Omitted: a small CPU demo on synthetic data (explicit flags still win)")
    g.add_argument("--data-root", default=None, help="folder holding the named datasets (./datasets)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the train/test split; stored in "
                   "the checkpoint (0)")
    g.add_argument("--synthetic-images", type=int, default=None, help="size of the synthetic dataset (1000)")
    g.add_argument("--img-size", type=int, default=None, help="global crop size (224; demo 64)")
    g.add_argument("--load-size", type=int, default=None,
                   help="decode size the training crops are taken from (default: native, at most 2x --img-size)")
    g.add_argument("--cache", default="auto",
                   help="uint8 cache of the decoded dataset: auto (default location), none, or a folder")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (4)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=list(ARCHS), help="ViT size (vit_small; demo vit_tiny)")
    g.add_argument("--patch-size", type=int, default=None, choices=[8, 16, 32], help="patch size (16; demo 16)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student only")
    g.add_argument("--out-dim", type=int, default=None, help="head output dim K (8192; demo 1024)")
    g.add_argument("--head-hidden", type=int, default=2048, help="hidden width of the head MLP")
    g.add_argument("--norm-last-layer", type=lambda v: str(v).lower() in ("1", "true", "yes"), default=None,
                   help="fix the row norms of the weight-normed last head layer at 1 "
                   "(default: false for vit_tiny/small, true for larger)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "triton"], help="attention kernel")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    g = p.add_argument_group("IPC-Masking (paper sec. 2.1)")
    g.add_argument("--mask-shape", default="block", choices=["block", "rand"],
                   help="block: BEiT/iBOT block-wise; rand: exactly round(r*N) random positions")
    g.add_argument("--clean-prob", type=float, default=0.5, help="probability that both student views "
                   "are unmasked (paper: ratio 0 with p 0.5). 1 = plain iBOT-style run, no IPC (ablation)")
    g.add_argument("--mask-ratio", type=float, nargs=2, default=(0.1, 0.5),
                   help="range of the ratio r of m (s1 masks r, s2 masks 1-r)")
    g.add_argument("--ipc-views", default="same", choices=["same", "cross"],
                   help="same: s1, s2 are one augmented crop (drawn per image) under m and 1-m (paper sec. 1, "
                   "2.2); cross: s1 = t1 under m, s2 = t2 under 1-m (ablation: no patch is preserved)")
    g = p.add_argument_group("losses and temperatures (paper sec. 2.1-2.3)")
    g.add_argument("--student-temp", type=float, default=0.1, help="temperature of the student softmax")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    g.add_argument("--teacher-temp", type=float, default=0.07, help="teacher temperature after warm-up")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=None, help="linear warm-up (30; demo 2)")
    g.add_argument("--center-momentum", type=float, default=0.9, help="EMA momentum of both centres")
    g.add_argument("--lambda1", type=float, default=1.0, help="weight of the [CLS] (GSD) loss")
    g.add_argument("--lambda2", type=float, default=1.0, help="weight of the patch (MIM) loss")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global-crops-scale", type=float, nargs=2, default=(0.25, 1.0),
                   help="area range of the random-resized crops t1, t2 (multi-scale)")
    g.add_argument("--local-crops", type=int, default=0, help="number of small crops ([CLS] loss only)")
    g.add_argument("--local-crop-size", type=int, default=None, help="local crop size (96; demo 32)")
    g.add_argument("--local-crops-scale", type=float, nargs=2, default=(0.05, 0.25), help="area range of local crops")
    g = p.add_argument_group("optimisation (paper sec. 3.1 (5))")
    g.add_argument("--epochs", type=int, default=None, help="300 (demo 4)")
    g.add_argument("--batch-size", type=int, default=None, help="per process (64; demo 32)")
    g.add_argument("--blr", type=float, default=5e-4, help="lr = blr * total_batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear lr warm-up (10; demo 1)")
    g.add_argument("--weight-decay", type=float, default=0.04, help="start of the wd cosine. The paper's "
                   "'0.004' reads as a typo of iBOT's 0.04 -> 0.4 schedule, used here")
    g.add_argument("--weight-decay-end", type=float, default=0.4, help="end of the wd cosine")
    g.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA momentum, cosine to 1")
    g.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient-norm clip (0=off)")
    g.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the last head layer frozen")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="autocast (bf16 on GPU)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (runs/gsc_mim_<data>)")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUT/checkpoint.pth if it exists")
    g.add_argument("--save-every", type=float, default=10, metavar="MINUTES", help="checkpoint every MINUTES "
                   "of wall clock (0: only at the end); always at the end, at --max-steps and on SIGTERM/SIGUSR1")
    g.add_argument("--eval-every", type=int, default=None, metavar="N", help="20-NN accuracy of the teacher "
                   "every N epochs into OUT/log.jsonl and OUT/curves.png (about 5 per run; 0: off)")
    g.add_argument("--eval-only", default=None, metavar="CKPT",
                   help="evaluate CKPT: data, split and model from the checkpoint; results beside it unless --out")
    g.add_argument("--eval-feat", default="cls", choices=["cls", "cls+avg"], help="evaluation features")
    g.add_argument("--export", default=None, metavar="CKPT",
                   help="write the backbone of CKPT with timm names to backbone.pth beside it unless --out")
    g.add_argument("--visualize", default=None, metavar="CKPT",
                   help="write visualize.png for CKPT beside it unless --out")
    g.add_argument("--bench", type=int, default=0, metavar="STEPS", help="benchmark STEPS steps and exit")
    g.add_argument("--seed", type=int, default=0, help="initial weights and shuffling; each rank adds its rank")
    g.add_argument("--log-every", type=int, default=20, help="steps between log lines (host syncs)")
    g.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many global steps")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    return p


# A resume must match the model (ARCH_KEYS). --eval-only/--export/--visualize take it from the checkpoint,
# with the masks --visualize draws and the seed (the table's random-init floor is that seed's backbone).
ARCH_KEYS = ("arch", "patch_size", "img_size", "out_dim", "head_hidden", "norm_last_layer")
MODEL_KEYS = (*ARCH_KEYS, "mask_shape", "mask_ratio", "clean_prob", "ipc_views", "seed", "skip_bad")


def same_data(a, b):
    """The same --data: a dataset name in any case, or two paths of one folder."""
    return str(a).lower() == str(b).lower() or Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def from_checkpoint(args, saved, ckpt):
    """--eval-only/--export/--visualize: the data, split and model of the run that wrote `ckpt`.
    Explicit flags win where that is safe (--data-root when the dataset moved, --batch-size,
    --workers, --cache, --out); another --data, --synthetic-images or --split-seed is refused, as
    another split would put pretraining images in the test split. Returns whether it was the demo."""
    for key in ("data", "synthetic_images", "split_seed"):
        mine, theirs = getattr(args, key), saved[key]
        if mine is not None and not (same_data(mine, theirs) if key == "data" else mine == theirs):
            flag = "--" + key.replace("_", "-")
            raise data.UserError(f"{flag} {mine} differs from the checkpoint's {theirs}: another dataset or split "
                                 f"would put pretraining images in the test split; omit {flag}")
        setattr(args, key, theirs)
    for key in MODEL_KEYS:
        setattr(args, key, saved[key])
    args.data_root, args.batch_size = args.data_root or saved["data_root"], args.batch_size or saved["batch_size"]
    args.workers = saved["workers"] if args.workers is None else args.workers
    args.out = args.out or str(Path(ckpt).parent)
    return saved["demo"]


def resolve_defaults(args, saved=None, ckpt=None):
    """No --data: CPU demo settings; otherwise the paper's. Explicit flags (not None) always win.
    saved: the args stored in `ckpt`, given to --eval-only/--export/--visualize (see from_checkpoint)."""
    demo = from_checkpoint(args, saved, ckpt) if saved else args.data is None
    d = dict(data="synthetic", arch="vit_tiny", img_size=64, patch_size=16, out_dim=1024, epochs=4,
             batch_size=32, warmup_epochs=1, warmup_teacher_temp_epochs=2, synthetic_images=600,
             local_crop_size=32) if demo else \
        dict(arch="vit_small", img_size=224, patch_size=16, out_dim=8192, epochs=300, batch_size=64,
             warmup_epochs=10, warmup_teacher_temp_epochs=30, synthetic_images=1000, local_crop_size=96)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.norm_last_layer is None:  # iBOT: free norms help small ViTs converge
        args.norm_last_layer = args.arch not in ("vit_tiny", "vit_small")
    named = str(args.data).lower() in [n.lower() for n in (*data.DATASETS, "synthetic")]
    if not named and Path(args.data).expanduser().is_dir():  # absolute in the checkpoint: found from any folder
        args.data = str(Path(args.data).expanduser().resolve())
    args.data_root = str(Path(args.data_root or "./datasets").expanduser().resolve())
    args.split_seed, args.workers = args.split_seed or 0, 4 if args.workers is None else args.workers
    args.eval_every = max(1, args.epochs // 5) if args.eval_every is None else args.eval_every
    args.amp = args.amp or ("bf16" if torch.cuda.is_available() else "none")
    args.out, args.demo = args.out or f"runs/gsc_mim_{Path(str(args.data)).name}", demo
    return args


# ---- Model: ViT backbone with timm's module names (state_dict keys are timm's) + the iBOT head ---
class DropPath(nn.Module):
    """Stochastic depth per sample (the student's; the teacher runs in eval mode: no drop)."""
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob  # one Bernoulli per sample, survivors scaled by 1/keep
        return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(keep).div_(keep)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major grid


class Attention(nn.Module):
    def __init__(self, dim, heads, backend="sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.backend == "triton":
            from kernels.attention import masked_attention  # lazy: --attn sdpa runs never import triton
            x = masked_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path, attn_backend):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder (paper sec. 2.3, Fig. 4). `mask` (bool [B, N]) replaces the patch embeddings at
    masked positions by the learnable e[MASK] (sec. 2.1, eq. 1); all tokens go through the encoder."""
    def __init__(self, arch="vit_small", patch_size=16, img_size=224, drop_path=0.0, attn="sdpa"):
        super().__init__()
        dim, depth, heads = ARCHS[arch]
        self.patch_size, self.embed_dim = patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # e[MASK], initialised 0
        dpr = np.linspace(0, drop_path, depth)  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([Block(dim, heads, float(r), attn) for r in dpr])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, gh, gw):
        """Learnable position embedding, bicubically resized for grids other than the trained one."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        g0 = int(math.sqrt(n))
        if gh * gw == n and gh == gw:
            return pos
        grid = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1)

    def prepare_tokens(self, x, mask=None):
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if mask is not None:  # sec. 2.1 eq. (1): x_i <- e[MASK] where m_i = 1
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], 1)
        return x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)

    def forward(self, x, mask=None):
        x = self.prepare_tokens(x, mask)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # [B, 1 + N, D]: [CLS] then patch tokens

    @torch.no_grad()
    def last_cls_attention(self, x):
        """[B, heads, N] attention of [CLS] to the patches in the last block (for --visualize)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        a = self.blocks[-1].attn
        B, N, C = x.shape
        q, k, _ = a.qkv(self.blocks[-1].norm1(x)).reshape(B, N, 3, a.heads, C // a.heads).permute(2, 0, 3, 1, 4)
        att = (q[:, :, :1] @ k.transpose(-2, -1) * (C // a.heads) ** -0.5).softmax(-1)
        return att[:, :, 0, 1:]


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class WeightNormLinear(nn.Module):
    """Linear(in, out, no bias) with weight = g * v / ||v|| per output row (Salimans & Kingma),
    written out by hand so deepcopy, EMA and state_dict see two plain tensors on any torch."""
    def __init__(self, in_dim, out_dim, fix_norm=True):
        super().__init__()
        bound = in_dim ** -0.5  # nn.Linear's default init, as DINO/iBOT's weight_norm(nn.Linear)
        self.weight_v = nn.Parameter(nn.init.uniform_(torch.empty(out_dim, in_dim), -bound, bound))
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not fix_norm)

    def forward(self, x):
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1)).unsqueeze(1)
        return F.linear(x, w.to(x.dtype))


class IBOTHead(nn.Module):
    """Projection head h shared by [CLS] and patch tokens (paper sec. 2.3): 3-layer MLP,
    L2-normalised 256-d bottleneck, weight-normed Linear(256, K)."""
    def __init__(self, in_dim, out_dim=8192, hidden=2048, bottleneck=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.mlp.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fix_norm=norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class GSCMIMNet(nn.Module):
    """g = h o f (sec. 2.2). One call runs both global views (concatenated along the batch), the
    optional local crops, and the head on the [CLS] tokens plus the patch tokens the loss uses."""
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_views, patch_index, mask=None, local_views=None):
        tokens = self.backbone(global_views, mask)  # [2B, 1 + N, D]
        cls = tokens[:, 0]
        if local_views is not None:
            cls = torch.cat([cls, self.backbone(local_views)[:, 0]])
        patches = tokens[:, 1:].reshape(-1, tokens.shape[-1]).index_select(0, patch_index)
        out = self.head(torch.cat([cls, patches]))
        return out[:len(cls)], out[len(cls):]  # [CLS] logits [V*B, K], patch logits [M, K]


def build_backbone(args, drop_path=0.0):
    return VisionTransformer(args.arch, args.patch_size, args.img_size, drop_path, args.attn)


def build_student_teacher(args):
    student = GSCMIMNet(build_backbone(args, args.drop_path),
                        IBOTHead(ARCHS[args.arch][0], args.out_dim, args.head_hidden,
                                 norm_last_layer=args.norm_last_layer))
    teacher = copy.deepcopy(student)  # same initial weights (sec. 2.2)
    teacher.backbone.mask_token = None  # the teacher never sees masks
    teacher.requires_grad_(False).eval()  # eval: DropPath is the identity
    return student, teacher


# ---- IPC-Masking (paper sec. 2.1): complementary masks on the patch grid, generated on the CPU ----
# (numpy, vectorised over the batch) so the GPU never waits for them
def block_mask(ratios, grid_h, grid_w, rng=np.random, max_tries=10, aspect=(0.3, 1 / 0.3)):
    """BEiT/iBOT block-wise masks, bool [B, grid_h*grid_w], target ratio[b] * N cells each.
    Each image runs its own sequential process (vectorised across images, one attempt per loop):
    draw a rectangle of area U[(grid/3)^2, remaining target], log-uniform aspect ratio, random
    position; add its new cells if the total stays within the target; an image stops after
    max_tries failed attempts in a row or when it reaches its target."""
    B = len(ratios)
    target = np.asarray(ratios, dtype=np.float64) * grid_h * grid_w
    min_area = (min(grid_h, grid_w) // 3) ** 2
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    mask = np.zeros((B, grid_h, grid_w), dtype=bool)
    count, tries = np.zeros(B), np.zeros(B, dtype=np.int64)
    rows, cols = np.arange(grid_h)[None, :, None], np.arange(grid_w)[None, None, :]
    idx = np.flatnonzero(count < target)  # images still drawing rectangles
    while len(idx):
        n, remaining = len(idx), target[idx] - count[idx]
        area = min_area + (remaining - min_area) * rng.random(n)  # = random.uniform(lo, hi)
        ar = np.exp(log_lo + (log_hi - log_lo) * rng.random(n))
        h = np.rint(np.sqrt(area * ar)).astype(np.int64)
        w = np.rint(np.sqrt(area / ar)).astype(np.int64)
        top = np.floor(rng.random(n) * (grid_h - h + 1)).astype(np.int64)
        left = np.floor(rng.random(n) * (grid_w - w + 1)).astype(np.int64)
        rect = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
        sub = mask[idx]
        new = (rect & ~sub).sum((1, 2))
        ok = (h < grid_h) & (w < grid_w) & (new > 0) & (new <= remaining)
        mask[idx] = sub | (rect & ok[:, None, None])
        count[idx] += np.where(ok, new, 0)
        tries[idx] = np.where(ok, 0, tries[idx] + 1)
        idx = idx[(tries[idx] < max_tries) & (count[idx] < target[idx])]
    return mask.reshape(B, -1)


def random_mask(ratios, n, rng=np.random):
    """Exactly round(r * N) uniformly random positions per image, bool [B, N]."""
    k = np.rint(np.asarray(ratios) * n).astype(np.int64)
    rank = rng.random((len(k), n)).argsort(1).argsort(1)
    return rank < k[:, None]


def ipc_masks(batch, grid_h, grid_w, clean_prob=0.5, ratio_range=(0.1, 0.5), shape="block", rng=np.random):
    """Information-preserved complementary masks (sec. 2.1, Fig. 3): one mask m per image; student
    view s1 masks m and s2 masks 1 - m, so every grid position is visible in exactly one view.
    With probability clean_prob both views are clean (sec. 3.1 (5): "ratio 0 with probability
    0.5"); otherwise r ~ U[ratio_range] and the roles of s1/s2 are swapped at random.
    Returns (m1, m2), bool numpy [B, N] (True = masked)."""
    clean = rng.random(batch) < clean_prob
    ratio = np.where(clean, 0.0, rng.uniform(ratio_range[0], ratio_range[1], size=batch))
    swap = rng.random(batch) < 0.5
    m = block_mask(ratio, grid_h, grid_w, rng) if shape == "block" else random_mask(ratio, grid_h * grid_w, rng)
    m1 = np.where(swap[:, None], ~m, m)
    m2 = ~m1
    m1[clean], m2[clean] = False, False
    return m1, m2


def student_view_rows(m1, m2, ipc_views, rng=np.random):
    """Which global crop each student row [s1; s2] is made from, and its [CLS] partner, as rows of
    the teacher's batch [t1; t2] (numpy int64 [2B] each).
    same (sec. 1: "two complementary masked views for the same image", sec. 2.2: "complementary
    masking to the same image"): per masked pair one crop v, drawn at random so that t1 and t2 play
    each role equally often, is the input of both students, under m and 1 - m: together they
    reconstruct every patch of that crop. Clean pairs (nothing to complement) keep s1 <- t1,
    s2 <- t2, so the students never run twice on the same unmasked input.
    cross (ablation): s1 <- t1, s2 <- t2 always. The [CLS] partner of a student row is the teacher's
    other crop (GSD is cross-view, eq. 4)."""
    B = len(m1)
    view = np.repeat([0, 1], B)  # cross layout
    if ipc_views == "same":
        masked = (m1 | m2).any(1)
        v = (rng.random(B) < 0.5).astype(np.int64)
        view = np.where(np.tile(masked, 2), np.tile(v, 2), view)
    b = np.tile(np.arange(B), 2)
    return view * B + b, (1 - view) * B + b


def masked_token_index(masks):
    """Flat indices (into [V*B*N]) of the masked positions, and each one's weight 1/#masked of its
    view-image: the only patch tokens the loss needs, so the 8192-way head runs on them alone."""
    flat = np.flatnonzero(masks)
    weight = (1.0 / np.maximum(masks.sum(1), 1))[flat // masks.shape[1]]
    return torch.from_numpy(flat), torch.from_numpy(weight.astype(np.float32))


# ---- Losses (paper sec. 2.1-2.3) and centring ----------------------------------------------------
def soft_cross_entropy(teacher_logits, student_logits, centre, teacher_temp, student_temp):
    """-softmax((t - c) / tau_t) . log_softmax(s / tau_s), per row (the H(P_t, P_s) of DINO/iBOT)."""
    t = F.softmax((teacher_logits.float() - centre) / teacher_temp, dim=-1)
    return -(t * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def patch_mim_loss(student_patch, teacher_patch, token_weight, batch, centre, teacher_temp, student_temp):
    """Complementary MIM loss (sec. 2.1, eq. 2, symmetrised): for each masked position i of student
    view s_v, H(softmax((t_i - c_p)/tau_t), s_v,i) with t the teacher's output for the unmasked crop
    s_v was made from (student_view_rows); summed over the masked positions, divided by max(1,
    #masked) per image (token_weight), mean over the batch, averaged over the 2 views.
    Rows are the gathered masked positions of both views ([M, K]), student and teacher aligned."""
    ce = soft_cross_entropy(teacher_patch, student_patch, centre, teacher_temp, student_temp)
    return (ce * token_weight).sum() / (2 * batch)


def cls_distillation_loss(student_cls, teacher_cls, partner, centre, teacher_temp, student_temp):
    """Global semantic distillation (sec. 2.2, eq. 4): cross-view [CLS] cross-entropy, each global
    student row against the teacher row partner[row] (the other augmented crop), every local crop
    against both t1 and t2; mean over all rows = mean over the (2 + 2L) view pairs of B rows each.
    student_cls [(2 + L) * B, K] ordered s1, s2, locals; teacher_cls [2B, K] ordered t1, t2."""
    n = len(teacher_cls)
    ce = [soft_cross_entropy(teacher_cls.index_select(0, partner), student_cls[:n], centre, teacher_temp, student_temp)]
    local = student_cls[n:].reshape(-1, n // 2, student_cls.shape[-1])  # [L, B, K]
    if len(local):
        t = teacher_cls.reshape(2, 1, n // 2, -1).expand(2, len(local), -1, -1)
        ce.append(soft_cross_entropy(t, local.expand(2, -1, -1, -1), centre, teacher_temp, student_temp).flatten())
    return torch.cat(ce).mean()


@torch.no_grad()
def update_centers(center_cls, center_patch, teacher_cls, teacher_patch, momentum=0.9):
    """Centring (iBOT): c <- m c + (1 - m) mean(teacher outputs), separately for [CLS] (over both
    global views) and patches. Sums are all-reduced across ranks; runs after the loss; no host sync.
    Patches: iBOT averages the teacher head over ALL patch tokens of t1, t2; here the head runs only
    on the positions the loss uses (all of them: ~6% more FLOPs for ViT-S/16 and a [2BN, K] tensor).
    The mean is unbiased all the same: in a masked pair these positions cover every grid cell exactly
    once (same: all of crop v at m and 1 - m; cross: t1 at m, t2 at 1 - m), the random draw of v (and
    of the s1/s2 roles) weighs t1, t2 equally in expectation, and clean pairs are a random subset.
    A step with no masked position keeps the old patch centre."""
    count = lambda n: teacher_cls.new_full((1,), n, dtype=torch.float32)  # noqa: E731 (a fill, no H2D copy)
    stats = torch.cat([teacher_cls.float().sum(0), teacher_patch.float().sum(0), count(len(teacher_cls)),
                       count(len(teacher_patch))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    K = center_cls.shape[-1]
    cls_mean, patch_mean, n_cls, n_patch = stats[:K], stats[K:2 * K], stats[-2], stats[-1]
    center_cls.mul_(momentum).add_(cls_mean / n_cls, alpha=1 - momentum)
    new_patch = center_patch * momentum + patch_mean / n_patch.clamp(min=1) * (1 - momentum)
    center_patch.copy_(torch.where(n_patch > 0, new_patch, center_patch))


# ---- Teacher (EMA, sec. 2.2) and schedules (precomputed arrays, DINO style) ----------------------
@torch.no_grad()
def ema_update(student, teacher, momentum):
    """theta_t <- lambda theta_t + (1 - lambda) theta_s over the parameters they share (sec. 2.2, eq. 3)."""
    s = dict(student.named_parameters())
    t_params, s_params = zip(*[(p, s[n].detach()) for n, p in teacher.named_parameters() if n in s])
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def cosine_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
    """Per-step values: linear warm-up from start_warmup, then a half cosine from base to final."""
    warmup_iters = min(warmup_epochs, epochs) * niter_per_ep
    warm = np.linspace(start_warmup, base, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(1, len(iters))))
    return np.concatenate([warm, cos])


def teacher_temperature_schedule(warmup_temp, temp, warmup_epochs, epochs):
    """Per-epoch teacher temperature: linear from warmup_temp to temp over warmup_epochs, then flat."""
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs),
                           np.full(max(0, epochs - warmup_epochs), temp)])[:max(epochs, 1)]


def param_groups(model):
    """Weight decay on weight matrices only (none on biases and 1-D parameters), and on the head's
    weight-norm gain: DINO/iBOT's weight_g has shape (K, 1), so their ndim rule decays it."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or n.endswith("weight_g") else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    """Per-parameter clipping (DINO): each gradient's norm at most `clip`, without a host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if clip > 0 and grads:
        coef = torch._foreach_add(torch._foreach_norm(grads), 1e-6)  # min(1, clip / (||g|| + 1e-6))
        torch._foreach_reciprocal_(coef)
        torch._foreach_mul_(coef, clip)
        torch._foreach_clamp_max_(coef, 1.0)
        torch._foreach_mul_(grads, coef)


# ---- Training ------------------------------------------------------------------------------------
def setup_distributed(args):
    """Global rank for logging, checkpoints and evaluation; LOCAL_RANK for the device of this node."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), world
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv (patch embedding)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
    if world > 1 and not dist.is_initialized():  # 3 h: the other ranks wait while rank 0 evaluates
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    args.device = torch.device(f"cuda:{local}" if cuda else "cpu")
    seed = args.seed + args.rank  # per-rank seed
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def build_run(args, niter_per_ep):
    """Models, optimiser, augmentations, schedules and method state in one namespace."""
    dev = args.device
    with torch.random.fork_rng(devices=[]):  # same initial weights on every rank (the seeds are
        torch.random.default_generator.manual_seed(args.seed)  # per rank): DDP syncs only the student
        student, teacher = build_student_teacher(args)
    student, teacher = student.to(dev), teacher.to(dev)
    if args.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    model = student
    if args.world_size > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    total_batch = args.batch_size * args.world_size
    lr = args.lr if args.lr is not None else args.blr * total_batch / 256
    opt = torch.optim.AdamW(param_groups(student), lr=lr, fused=dev.type == "cuda")
    common = dict(hflip=0.5, vflip=0.5, rot90=0.75,  # 0.75: k uniform in {0,1,2,3}
                  jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
    return SimpleNamespace(
        args=args, device=dev, student=student, model=model, teacher=teacher, optimizer=opt,
        scaler=torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16"),
        aug_t1=data.BatchAugment(args.img_size, scale=args.global_crops_scale, blur_p=1.0, **common),
        aug_t2=data.BatchAugment(args.img_size, scale=args.global_crops_scale, blur_p=0.1, solarize_p=0.2, **common),
        aug_local=data.BatchAugment(args.local_crop_size, scale=args.local_crops_scale, blur_p=0.5, **common),
        lr_schedule=cosine_schedule(lr, args.min_lr, args.epochs, niter_per_ep, args.warmup_epochs),
        wd_schedule=cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep),
        momentum_schedule=cosine_schedule(args.momentum_teacher, 1.0, args.epochs, niter_per_ep),
        teacher_temp=teacher_temperature_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                                  args.warmup_teacher_temp_epochs, args.epochs),
        center_cls=torch.zeros(1, args.out_dim, device=dev),
        center_patch=torch.zeros(1, 1, args.out_dim, device=dev),
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp))


def train_step(run, images, masks, it, epoch):
    """One GSC-MIM step on a uint8 batch and its IPC masks (ipc_batch: built by the loader's threads);
    returns detached loss tensors (no host sync)."""
    args, dev, opt = run.args, run.device, run.optimizer
    for g in opt.param_groups:
        g["lr"] = float(run.lr_schedule[it])
    opt.param_groups[0]["weight_decay"] = float(run.wd_schedule[it])  # the no-decay group stays at 0
    images = images.to(dev, non_blocking=True)
    B = images.shape[0]
    (t1, _), (t2, _) = run.aug_t1(images), run.aug_t2(images)
    local = torch.cat([run.aug_local(images)[0] for _ in range(args.local_crops)]) if args.local_crops else None
    masks_t, index, t_index, weight, rows, partner = [t.to(dev, non_blocking=True) for t in masks]  # pinned by ipc_batch on CUDA
    views = torch.cat([t1, t2])  # both global crops through the encoder in one call
    tt = float(run.teacher_temp[min(epoch, len(run.teacher_temp) - 1)])
    with torch.autocast(dev.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        with torch.no_grad():
            t_cls, t_patch = run.teacher(views, t_index)  # teacher sees t1, t2 unmasked
        s_cls, s_patch = run.model(views.index_select(0, rows), index, mask=masks_t, local_views=local)
        loss_cls = cls_distillation_loss(s_cls, t_cls, partner, run.center_cls, tt, args.student_temp)
        loss_mim = patch_mim_loss(s_patch, t_patch, weight, B, run.center_patch[0], tt, args.student_temp)
        loss = args.lambda1 * loss_cls + args.lambda2 * loss_mim  # sec. 2.3, eq. (5)
    opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(opt)
    clip_gradients(run.student, args.clip_grad)
    if epoch < args.freeze_last_layer:  # last head layer frozen in the first epoch(s)
        for p in run.student.head.last_layer.parameters():
            p.grad = None
    run.scaler.step(opt)
    run.scaler.update()
    ema_update(run.student, run.teacher, float(run.momentum_schedule[it]))
    update_centers(run.center_cls, run.center_patch, t_cls, t_patch, args.center_momentum)
    return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_mim": loss_mim.detach()}


def ipc_batch(rng, batch, args):
    """A batch's IPC masks (bool [2B, N]: student view s1, then s2), the students' crops and [CLS]
    partners (student_view_rows), and the loss's masked-token index, teacher index and weights.
    build_loader's batch_extras: built in the loader's threads, off the training thread, with
    rng = np.random.default_rng([seed, rank, epoch, batch index]) (resumes exactly); pinned on CUDA
    so that train_step's copies to the device are asynchronous."""
    g = args.img_size // args.patch_size
    m1, m2 = ipc_masks(batch, g, g, args.clean_prob, args.mask_ratio, args.mask_shape, rng)
    rows, partner = student_view_rows(m1, m2, args.ipc_views, rng)
    masks = np.concatenate([m1, m2])
    index, weight = masked_token_index(masks)
    t_index = torch.from_numpy(rows)[index // g ** 2] * g ** 2 + index % g ** 2  # same crop, same cell
    out = (torch.from_numpy(masks), index, t_index, weight, torch.from_numpy(rows), torch.from_numpy(partner))
    return tuple(t.pin_memory() for t in out) if torch.cuda.is_available() else out


def resolve_load_size(args):
    return data.resolve_load_size(args.data, args.data_root, args.img_size, args.load_size, args.synthetic_images)


def build_train_loader(args):
    """(uint8 images, labels, ipc_batch) batches: the IPC masks are made beside the images."""
    return data.build_loader(args.data, args.data_root, "train", size=args.load_size, batch_size=args.batch_size,
                             shuffle=True, drop_last=True, seed=args.seed, split_seed=args.split_seed,
                             workers=args.workers, cache=args.cache, synthetic_images=args.synthetic_images,
                             skip_bad=args.skip_bad, batch_extras=functools.partial(ipc_batch, args=args))


def dataset_and_digest(args, ck=None, path=None):
    """The run's dataset and a digest of its train/test split (relative paths), kept in checkpoints:
    a resume or --eval-only of `ck` on other files or another split is refused, a moved copy is not."""
    scenes = data.build_dataset(args.data, args.data_root, "all", seed=args.split_seed, img_size=args.img_size,
                                synthetic_images=args.synthetic_images, skip_bad=args.skip_bad)
    split = [[scenes.all_samples[i] for i in scenes.splits[k]] for k in ("train", "test")]
    digest = hashlib.sha1(json.dumps(split).encode()).hexdigest()
    if ck is not None and ck["split_digest"] != digest:
        raise data.UserError(f"the files of {args.data} under {args.data_root} differ from the ones {path} was "
                             f"trained on: pass the --data-root of that run")
    return scenes, digest


# ---- Checkpoints: written in the background; every rank resumes its own random streams ----------
def rng_state():  # python, numpy, torch cpu and this process's GPU (augmentations, drop-path)
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):  # returns None (the caller clears its pending state with it)
    # .cpu(): torch.set_rng_state rejects the ByteTensors of a checkpoint mapped to a GPU
    random.setstate(s["python"]), np.random.set_state(s["numpy"]), torch.set_rng_state(s["torch"].cpu())
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"].cpu())


def load_gsc_checkpoint(path):
    """data.load_checkpoint (on the CPU), refused unless gsc_mim.py wrote it."""
    ck = data.load_checkpoint(path)
    if ck.get("script") != "gsc_mim.py":
        raise data.UserError(f"{path} is a checkpoint of {ck.get('script', 'another script')}, not of "
                             f"gsc_mim.py: pass a checkpoint.pth written by gsc_mim.py")
    return ck


def check_resume(ck, path, args):
    """--resume continues the same run: the same model, data and split (the files: dataset_and_digest)."""
    saved = ck["args"]
    for k in ARCH_KEYS:
        if saved[k] != getattr(args, k):
            raise data.UserError(f"{path} has --{k.replace('_', '-')} {saved[k]}, this run {getattr(args, k)}: "
                                 f"resume with the checkpoint's model flags")
    if not same_data(saved["data"], args.data) or saved["split_seed"] != args.split_seed:
        raise data.UserError(f"{path} was trained on --data {saved['data']} --split-seed {saved['split_seed']}, "
                             f"this run has --data {args.data} --split-seed {args.split_seed}: resume on the same "
                             f"data and split")


def restore(run, ck, niter):
    """Load a checkpoint into the run. Every rank takes its own saved RNG streams; ranks beyond the
    saved ones keep their fresh seed + rank streams (never a copy of another rank's). Returns (epoch,
    step in epoch, the rank's RNG state to set, its running epoch sums)."""
    args = run.args
    for k in ("student", "teacher", "optimizer", "scaler"):
        getattr(run, k).load_state_dict(ck[k])
    run.center_cls.copy_(ck["center_cls"]), run.center_patch.copy_(ck["center_patch"])
    epoch, step, saved_world = ck["epoch"], ck["step_in_epoch"], len(ck["ranks"])
    rng = ck["ranks"][args.rank]["rng"] if args.rank < saved_world else None
    sums = None
    if saved_world == args.world_size:
        sums = {k: v.to(args.device) for k, v in ck["ranks"][args.rank]["sums"].items()} if step else None
    else:  # another sharding: skip the same share of the epoch; its mean covers the resumed part only
        step = step * saved_world // args.world_size
        epoch, step = (epoch + 1, 0) if step >= niter else (epoch, step)
    if args.rank == 0:
        print(f"resumed from epoch {epoch} step {step}" + ("" if saved_world == args.world_size else
              f" (saved by {saved_world} processes, now {args.world_size}: not an exact continuation)"), flush=True)
    return epoch, step, rng, sums


def progress(run, global_step):
    """Training wall clock (evaluations excluded, earlier runs of a resumed one included), images seen."""
    a = run.args
    return {"time_s": round(time.time() - run.t0, 3),
            "images_seen": run.images0 + (global_step - run.step0) * a.batch_size * a.world_size}


def save_checkpoint(run, path, epoch, step_in_epoch, global_step, sums):
    """Collective (every rank calls it): the RNG states and running epoch sums of EVERY rank are
    gathered, so each rank resumes its own random streams; rank 0 hands a host snapshot to the
    background writer, so training waits for the device-to-host copy only."""
    ranks = [{"rng": rng_state(), "sums": {k: v.cpu() for k, v in sums.items()}}]
    if dist.is_available() and dist.is_initialized():
        ranks = ranks * dist.get_world_size()
        dist.all_gather_object(ranks, ranks[0])
    if run.args.rank != 0:
        return
    ckpt = {"script": "gsc_mim.py", "student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, **progress(run, global_step),
            "args": {k: v for k, v in vars(run.args).items() if k != "device"}, "ranks": ranks,
            "split_digest": run.split_digest, "center_cls": run.center_cls, "center_patch": run.center_patch}
    run.writer.save(ckpt, path)
    print(f"checkpoint {path} at epoch {epoch} step {step_in_epoch}: snapshot {run.writer.snapshot_ms:.0f} ms "
          f"(previous write {run.writer.write_ms:.0f} ms, in the background)", flush=True)


def reduce_mean(sums, n):
    """All-reduce summed metrics across ranks; returns python floats (one host sync)."""
    keys = sorted(sums)
    t = torch.stack([sums[k].float() for k in keys] + [torch.tensor(float(n), device=sums[keys[0]].device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


# ---- The log: OUT/log.jsonl (epoch means, kNN accuracy) and OUT/curves.png -----------------------
def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path, step):
    """A resume drops the records newer than its checkpoint (trained again, logged again); a fresh run all."""
    keep = [r for r in read_log(path) if step and r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_log(log_path, png):
    records = read_log(log_path)
    floor = next((r["knn_floor"] for r in records if "knn_floor" in r), None)
    data.plot_curves([r for r in records if "time_s" in r], png, floor)
    return records


def evaluate_during_training(run, record, log_path):
    """20-NN accuracy of the current teacher (the final table's protocol) on global rank 0 while the
    other ranks wait at a barrier; the RNG streams and the models are left as they were, so where
    evaluations happen never changes training (exact resume). The random-init floor once per run."""
    args = run.args
    if args.rank == 0:
        start, state = time.time(), rng_state()
        if not any("knn_floor" in r for r in read_log(log_path)):
            append_log(log_path, {"knn_floor": evaluate_backbone(initial_backbone(args), args, knn_only=True)})
        knn = evaluate_backbone(run.teacher.backbone, args, knn_only=True)
        append_log(log_path, dict(record, knn=knn))
        plot_log(log_path, Path(args.out) / "curves.png")
        set_rng_state(state)
        print(f"epoch {record['epoch']} 20-NN {knn:.2f}% ({time.time() - start:.1f} s)", flush=True)
        run.t0 += time.time() - start  # the curves' wall clock is training time
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def log_step(run, losses, epoch, it, niter, global_step, total_steps, t_epoch, start_step):
    """The log line (a host sync, every --log-every steps); a non-finite loss ends the run."""
    args = run.args
    m = reduce_mean(losses, 1)
    if not math.isfinite(m["loss"]):
        raise data.UserError(f"loss is {m['loss']} at step {global_step}: lower --lr / --blr, or use --amp bf16")
    dt = time.time() - t_epoch
    ips = args.batch_size * args.world_size * (it + 1 - start_step) / max(dt, 1e-9)
    eta = (total_steps - global_step) * args.batch_size * args.world_size / max(ips, 1e-9)
    if args.rank == 0:
        print(f"epoch {epoch} step {it + 1}/{niter} loss {m['loss']:.4f} cls {m['loss_cls']:.4f} "
              f"mim {m['loss_mim']:.4f} lr {run.lr_schedule[global_step - 1]:.2e} "
              f"img/s {ips:.1f} eta {eta / 60:.1f} min", flush=True)


def end_epoch(run, sums, n_done, epoch, global_step, log_path):
    """Epoch means into OUT/log.jsonl; the kNN evaluation every --eval-every epochs and after the last."""
    args = run.args
    stats = reduce_mean(sums, n_done)
    stats.update(epoch=epoch, step=global_step, **progress(run, global_step),
                 lr=float(run.lr_schedule[global_step - 1]), wd=float(run.wd_schedule[global_step - 1]),
                 teacher_temp=float(run.teacher_temp[min(epoch, len(run.teacher_temp) - 1)]),
                 momentum=float(run.momentum_schedule[global_step - 1]))
    if args.rank == 0:
        append_log(log_path, stats)
    if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
        evaluate_during_training(run, {"epoch": epoch, "step": global_step, **progress(run, global_step)}, log_path)


def train(args):
    """Pretrain into OUT; returns the run, or None when preempted (checkpointed: exit 0 and resume)."""
    out, main_proc = Path(args.out), args.rank == 0
    ckpt_path, log_path = out / "checkpoint.pth", out / "log.jsonl"
    resume = str(ckpt_path) if args.resume == "auto" and ckpt_path.exists() else args.resume
    ck = load_gsc_checkpoint(resume) if resume and resume != "auto" else None
    if ck:
        check_resume(ck, resume, args)
    scenes, digest = dataset_and_digest(args, ck, resume)
    args.load_size = resolve_load_size(args)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        print("args: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
        data.save_splits(scenes, out / "splits.json")
        trim_log(log_path, ck["global_step"] if ck else 0)
    loader = build_train_loader(args)
    niter = len(loader)
    run = build_run(args, niter)
    run.writer, run.split_digest = data.CheckpointWriter(), digest
    start_epoch, start_step, pending_rng, sums0 = restore(run, ck, niter) if ck else (0, 0, None, None)
    global_step = start_epoch * niter + start_step
    run.t0, run.step0, run.images0 = time.time() - (ck["time_s"] if ck else 0), global_step, ck["images_seen"] if ck else 0
    total_steps = args.epochs * niter if args.max_steps is None else min(args.max_steps, args.epochs * niter)
    points = data.SavePoints(args.save_every, args.device)
    for epoch in range(start_epoch, args.epochs):
        if global_step >= total_steps:
            break
        if pending_rng is not None and start_step == 0:  # epoch boundary: restore before the loader draws
            pending_rng = set_rng_state(pending_rng)  # (returns None)
        loader.sampler.set_epoch(epoch)
        sums = sums0 or {k: torch.zeros((), device=args.device) for k in ("loss", "loss_cls", "loss_mim")}
        n_done = start_step if sums0 else 0
        sums0, t_epoch = None, time.time()
        for it, (images, _, masks) in enumerate(loader):
            if it < start_step:  # mid-epoch resume: skip the batches already trained on
                continue
            if pending_rng is not None:  # mid-epoch: restore after the loader iterator drew its seeds
                pending_rng = set_rng_state(pending_rng)
            losses = train_step(run, images, masks, global_step, epoch)
            for k in sums:
                sums[k] += losses[k]
            n_done, global_step = n_done + 1, global_step + 1
            end_of_epoch = it == niter - 1
            if global_step % args.log_every == 0 or end_of_epoch:
                log_step(run, losses, epoch, it, niter, global_step, total_steps, t_epoch, start_step)
            if end_of_epoch:
                end_epoch(run, sums, n_done, epoch, global_step, log_path)
            save, stop = points.check(global_step)  # every rank, every step: they agree under DDP
            position = (epoch + 1, 0) if end_of_epoch else (epoch, it + 1)
            if save or global_step >= total_steps:
                save_checkpoint(run, ckpt_path, *position, global_step, sums)
            if stop:
                run.writer.wait()
                if main_proc:
                    print(f"preempted ({points.signal}): checkpoint {ckpt_path} at epoch {position[0]} step "
                          f"{position[1]}; resume with the same command plus --resume auto", flush=True)
                return None
            if global_step >= total_steps:
                break
        start_step = 0
    run.writer.wait()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return run


# ---- Evaluation (SPEC section 0): frozen teacher backbone, linear@1%, linear@100%, 20-NN ---------
@torch.no_grad()
def extract_features(backbone, split, args):
    loader = data.build_loader(args.data, args.data_root, split, size=args.img_size, batch_size=args.batch_size,
                               shuffle=False, drop_last=False, seed=args.seed, split_seed=args.split_seed,
                               workers=args.workers, cache=args.cache, synthetic_images=args.synthetic_images,
                               skip_bad=args.skip_bad, distributed=False)
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        x = data.normalize(images.to(args.device))
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.device.type == "cuda"):
            tok = backbone(x).float()
        f = tok[:, 0] if args.eval_feat == "cls" else torch.cat([tok[:, 0], tok[:, 1:].mean(1)], 1)
        feats.append(f)
        labels.append(y.to(args.device))
    return F.normalize(torch.cat(feats), dim=1), torch.cat(labels), len(loader.dataset.classes)


def linear_probe(x_train, y_train, x_test, y_test, n_classes, weight_decay=5e-4, steps=100):
    """Linear classifier on L2-normalised frozen features, standardised per dimension with the
    training split's mean/std (MAE's BatchNorm-without-affine before the linear layer): full-batch
    L-BFGS (strong Wolfe), zero init, 100 iterations, L2 penalty 5e-4. Fixed, no tuning on test."""
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False) + 1e-6 if len(x_train) > 1 else 1.0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    with torch.enable_grad():
        W = torch.zeros(x_train.shape[1], n_classes, device=x_train.device, requires_grad=True)
        b = torch.zeros(n_classes, device=x_train.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x_train @ W + b, y_train) + weight_decay * W.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
    return ((x_test @ W + b).argmax(1) == y_test).float().mean().item() * 100


def knn_classifier(x_train, y_train, x_test, y_test, n_classes, k=20, T=0.07):
    """Weighted k-NN (DINO): cosine similarity, votes exp(sim / T) over the k nearest."""
    correct = 0
    for i in range(0, len(x_test), 1024):
        sim, idx = (x_test[i:i + 1024] @ x_train.T).topk(min(k, len(x_train)), dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, y_train[idx], (sim / T).exp())
        correct += (votes.argmax(1) == y_test[i:i + 1024]).sum().item()
    return 100.0 * correct / len(x_test)


def evaluate_backbone(backbone, args, knn_only=False):
    """The 20-NN accuracy (alone during training), linear@1% and linear@100%."""
    xtr, ytr, c = extract_features(backbone, "train", args)
    xte, yte, _ = extract_features(backbone, "test", args)
    knn = knn_classifier(xtr, ytr, xte, yte, c)
    if knn_only:
        return knn
    x1, y1, _ = extract_features(backbone, "train1", args)
    return {"linear@1%": linear_probe(x1, y1, xte, yte, c), "linear@100%": linear_probe(xtr, ytr, xte, yte, c),
            "knn": knn}


def initial_backbone(args):
    """The seed's randomly initialised backbone = the student's initial one (see build_run): the floor."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(args.seed)
        return build_backbone(args).to(args.device)


def evaluate(backbone, args, log_path):
    """Teacher vs randomly initialised backbone (the floor): prints a table, writes OUT/eval.json;
    then OUT/curves.png and the time to accuracy from the run's log_path."""
    res = {"gsc_mim": evaluate_backbone(backbone, args), "random_init": evaluate_backbone(initial_backbone(args), args)}
    print(f"\n{'backbone':<12} {'linear@1%':>10} {'linear@100%':>12} {'knn':>8}   ({args.data}, {args.arch}/{args.patch_size})")
    for name, r in res.items():
        print(f"{name:<12} {r['linear@1%']:>10.2f} {r['linear@100%']:>12.2f} {r['knn']:>8.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "eval.json").write_text(json.dumps(res, indent=2))
    if Path(log_path).exists():
        seconds = data.time_to_accuracy(plot_log(log_path, Path(args.out) / "curves.png"))
        if seconds is not None:
            print(f"time to accuracy: {seconds:.0f} s (kNN within 1 point of its final value)")


def teacher_backbone(ck, args):
    """The teacher encoder of a checkpoint (args already carry its model flags: from_checkpoint)."""
    backbone = build_backbone(args)
    sd = {k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
    missing = backbone.load_state_dict(sd, strict=False).missing_keys
    assert missing == ["mask_token"], missing
    return backbone.to(args.device)


def export(backbone, args):
    """OUT/backbone.pth: the teacher encoder under timm VisionTransformer key names."""
    sd = {k: v for k, v in backbone.state_dict().items() if k != "mask_token"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(sd, Path(args.out) / "backbone.pth")
    print(f"wrote {Path(args.out) / 'backbone.pth'} ({len(sd)} tensors)")


# ---- Visualisation: crops, the IPC student views, last-layer [CLS] attention (sec. 3.2.3) ---------
@torch.no_grad()
def visualize(backbone, args, n_images=6):
    """OUT/visualize.png: n_images of the test split, their IPC masks and [CLS] attention."""
    from PIL import Image
    backbone.eval()
    ds = data.build_dataset(args.data, args.data_root, "test", seed=args.split_seed, img_size=args.img_size,
                            synthetic_images=args.synthetic_images)
    S, p = args.img_size, args.patch_size  # n_images spread over the (class-sorted) test split:
    images = torch.stack([torch.from_numpy(np.array(ds[int(i)][0].resize((S, S), Image.BILINEAR))).permute(2, 0, 1)
                          for i in np.linspace(0, len(ds) - 1, n_images)]).to(args.device)
    B = len(images)
    g = S // p
    crop = data.BatchAugment(S, scale=args.global_crops_scale, vflip=0.5, rot90=0.75, jitter_p=0.0, gray_p=0.0,
                             mean=(0, 0, 0), std=(1, 1, 1))  # geometry only, pixels in [0, 1]
    views = torch.cat([crop(images)[0], crop(images)[0]]) * 255  # t1, t2
    rng = np.random.default_rng(args.seed)
    m1, m2 = ipc_masks(B, g, g, clean_prob=0.0, ratio_range=args.mask_ratio, shape=args.mask_shape, rng=rng)
    rows, _ = student_view_rows(m1, m2, args.ipc_views, rng)  # the students' crops, as in train_step
    att = backbone.last_cls_attention(data.normalize(images)).mean(1).reshape(B, 1, g, g)
    att = (att - att.amin((2, 3), keepdim=True)) / (att.amax((2, 3), keepdim=True) - att.amin((2, 3), keepdim=True) + 1e-8)
    att = F.interpolate(att, size=(S, S), mode="nearest")[:, 0]
    heat = torch.stack([att, att * 0.4, 1 - att], 1) * 255  # blue (low) to red (high)

    m = torch.from_numpy(np.concatenate([m1, m2])).reshape(2 * B, 1, g, g).float().to(images.device)
    m = m.repeat_interleave(p, 2).repeat_interleave(p, 3)  # grid mask -> pixel mask
    s = views[torch.from_numpy(rows).to(images.device)] * (1 - m) + 128 * m
    cols = [views[:B], views[B:], s[:B], s[B:], 0.5 * images.float() + 0.5 * heat]
    grid = torch.cat([torch.cat([c[i] for c in cols], 2) for i in range(B)], 1)  # row per image
    path = Path(args.out) / "visualize.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()).save(path)
    print(f"wrote {path}: columns = t1 | t2 | s1 (m masked) | s2 (1-m masked) ({args.ipc_views}) | [CLS] attention on the input")


# ---- Benchmark: random tensors of the real shapes ------------------------------------------------
def step_flops(args, n_masked_per_image):
    """Model FLOPs of one step per image: student fwd+bwd (3x) and teacher fwd (1x) on 2 views."""
    D, depth, _ = ARCHS[args.arch]
    n = (args.img_size // args.patch_size) ** 2 + 1
    enc = depth * (2 * 12 * D * D * n + 4 * n * n * D)  # qkv/proj/mlp matmuls + attention
    h = args.head_hidden
    head_tok = 2 * (D * h + h * h + h * 256 + 256 * args.out_dim)
    per_view = enc + head_tok * (1 + n_masked_per_image / 2)
    return 2 * 4 * per_view


def bench_data_side(args):
    """Host ms per step of the data side, outside the model: waiting for a training batch of the real
    loader (decode or cache read, and the IPC masks in its workers), and the IPC masks alone."""
    loader = build_train_loader(args)
    batches = iter(loader)
    next(batches)  # the workers start
    n = max(1, min(args.bench, len(loader) - 1))
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    t1 = time.perf_counter()
    for i in range(n):
        ipc_batch(np.random.default_rng(i), args.batch_size, args)
    return (t1 - t0) / n * 1e3, (time.perf_counter() - t1) / n * 1e3


def bench(args):
    setup_distributed(args)
    args.load_size = resolve_load_size(args)
    run = build_run(args, max(args.bench, 1))
    dev = run.device
    host_ms = bench_data_side(args)
    images = torch.randint(0, 256, (args.batch_size, 3, args.load_size, args.load_size), dtype=torch.uint8, device=dev)
    masks = ipc_batch(np.random.default_rng(0), args.batch_size, args)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up (and compilation)
        train_step(run, images, masks, 0, 1)
    sync()
    torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
    t0 = time.perf_counter()
    for i in range(args.bench):
        train_step(run, images, masks, i, 1)
    sync()
    dt = (time.perf_counter() - t0) / args.bench
    ips = args.batch_size * args.world_size / dt
    # share of the step spent in the softmax / cross-entropy of the losses (fwd + bwd) at these shapes
    N = (args.img_size // args.patch_size) ** 2
    M = int(round(args.batch_size * N * (1 - args.clean_prob)))  # expected masked tokens, both views
    s_p, t_p, s_c, t_c = [torch.randn(n, args.out_dim, device=dev, requires_grad=g)
                          for n, g in ((M, True), (M, False), (2 * args.batch_size, True), (2 * args.batch_size, False))]
    w = torch.full((M,), 1.0 / N, device=dev)
    sync()
    t1 = time.perf_counter()
    for _ in range(3):
        (patch_mim_loss(s_p, t_p, w, args.batch_size, run.center_patch[0], 0.07, 0.1)
         + cls_distillation_loss(s_c, t_c, torch.arange(2 * args.batch_size, device=dev).roll(args.batch_size),
                                 run.center_cls, 0.07, 0.1)).backward()
    sync()
    loss_ms = (time.perf_counter() - t1) / 3 * 1000
    line = (f"bench {args.arch}/{args.patch_size} img {args.img_size} batch {args.batch_size}x{args.world_size} K {args.out_dim} "
            f"amp {args.amp} attn {args.attn} compile {args.compile} on {dev.type}: {ips:.1f} images/s, step {dt * 1000:.1f} ms, "
            f"softmax/CE of the losses {loss_ms:.1f} ms ({100 * loss_ms / (dt * 1000):.1f}% of the step); host data "
            f"side per step: loader {host_ms[0]:.1f} ms (its threads build the IPC masks), "
            f"IPC masks alone {host_ms[1]:.1f} ms")
    if dev.type == "cuda":
        line += ", TF32 matmul/cudnn on, cudnn.benchmark on"
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if k in name), None)
        flops = step_flops(args, N * (1 - args.clean_prob)) * args.batch_size / dt
        mfu = f"{100 * flops / peak:.1f}%" if peak else "n/a (unknown GPU peak)"
        line += f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, MFU {mfu} ({name})"
    print(line, flush=True) if args.rank == 0 else None
    return ips


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    modes = [m for m in ("eval_only", "export", "visualize") if getattr(args, m)]
    if len(modes) > 1:
        raise data.UserError("use one of --eval-only, --export, --visualize at a time")
    path = getattr(args, modes[0]) if modes else None
    if path and int(os.environ.get("RANK", 0)) != 0:  # launched by torchrun: rank 0 alone writes
        return
    ck = load_gsc_checkpoint(path) if path else None
    args = resolve_defaults(args, ck and ck["args"], path)
    if args.bench:
        bench(args)
    elif ck:  # output beside the checkpoint unless --out (from_checkpoint); one process, no ranks
        args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = teacher_backbone(ck, args)
        if args.eval_only:  # the checkpoint's split (refused on other files), its log's curves
            data.save_splits(dataset_and_digest(args, ck, path)[0], Path(args.out) / "splits.json")
            evaluate(backbone, args, Path(path).parent / "log.jsonl")
        else:
            export(backbone, args) if args.export else visualize(backbone, args)
    else:
        setup_distributed(args)
        t0 = time.time()
        run = train(args)
        if run is not None and args.rank == 0:
            print(f"total wall time {time.time() - t0:.1f} s", flush=True)
            if not args.no_eval:
                evaluate(run.teacher.backbone, args, Path(args.out) / "log.jsonl")
            if args.demo:  # the demo ends with its picture: inputs, IPC masks, [CLS] attention
                visualize(run.teacher.backbone, args)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    data.run_main(main)
