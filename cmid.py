"""CMID: Contrastive Mask Image Distillation, in one file.

Paper: Muhtar et al., IEEE TGRS 2023, arXiv 2304.09670; official code NJU-LHRS/official-CMID.

A student sees two masked views of an image (random_grid_masks: 30 of 49 cells, mean-filled, plus
a mask token); an EMA teacher sees them unmasked. Three losses (paper section III): MIM, the
student reconstructs the masked pixels (focal_l1_loss + focal_frequency_loss); global, MoCo-v2
InfoNCE between the student's masked view and the teacher's other view against a queue
(infonce_loss); local, DINO-style distillation between feature-map cells of the two views that lie
closest in the original image (match_cells, local_distill_loss). ResNet-50 (torchvision names)
and ViT-Tiny/S/B (timm names); Adan optimiser written in the file. Read top to bottom: args ->
model -> masking -> losses -> teacher/EMA + optimiser -> schedules -> train -> evaluate ->
visualize -> bench -> main.

As the official code: the batch-averaged focal frequency loss with unmask weight 0.001
(FocalFrequencyLoss ave_spectrum, log_matrix, batch_matrix); view-2 ops in the albumentations order
and ranges; the last BN of each bottleneck zero-initialised; the mask token weight-decayed; each cell
matched to its nearest cell of the other view, once per direction, the local head on the matched
cells only, the centre updated after each direction.

Differs from the official code:
- cells matched through the real crop boxes and flips (official: fractional offsets);
- queue keys carry image ids and a query never meets its own image among the negatives (official:
  no ids; on ~1M images they never meet, on AID or UCM the queue spans epochs);
- keys all-gathered once per step and enqueued once (official: N copies of each key with N GPUs);
- local pairs capped at the cell count; the augmentations run batched on the device;
- ViT support (the paper claims it; the official code has ResNet-50 and Swin-B; no Swin here), its
  map average-pooled to the stride-32 grid for the local branch (7x7 cells, as ResNet's);
- evaluation's random-init floor (curves and table) re-estimates BatchNorm statistics on the train images.

Launch:
    python cmid.py                                      # CPU demo: synthetic, ViT-Tiny, 64 px
    python cmid.py --data UCM --data-root ../shared/data --epochs 20 --batch-size 32
    torchrun --standalone --nproc_per_node=8 cmid.py --data AID --data-root /datasets   # paper recipe
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=run1 cmid.py --data AID --data-root /datasets --resume auto       # on each node
    python cmid.py --eval-only runs/cmid_UCM/checkpoint.pth      # also --export, --visualize
    python cmid.py --bench 20 --arch resnet50 --batch-size 64
--resume auto continues exactly from OUT/checkpoint.pth (saved every --save-every minutes, at the end and on
SIGTERM/SIGUSR1). --eval-only, --export and --visualize take the data, split and model from the checkpoint
and write beside it (unless --out).
"""
import argparse
import copy
import datetime
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data

CMID_MEAN = (0.33797, 0.3605, 0.3348)   # the official code's remote-sensing statistics (Dataset/transform.py)
CMID_STD = (0.1359, 0.1352, 0.1407)


# ----------------------------------------------------------------------------------------- args
def get_args_parser():
    p = argparse.ArgumentParser("CMID", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="AID | NWPU-RESISC45 | UCM | synthetic | folder-per-class "
                   "path; omitted = small CPU demo on synthetic data")
    g.add_argument("--data-root", default="./datasets", help="where the named datasets live")
    g.add_argument("--synthetic-images", type=int, default=None, help="size of the synthetic dataset (1000; demo 500)")
    g.add_argument("--img-size", type=int, default=None, help="training crop size; evaluation resizes to it (224; demo 64)")
    g.add_argument("--load-size", type=int, default=None,
                   help="decode size the training crops are taken from (default: native, at most 2x --img-size)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    g.add_argument("--cache", default="auto", help="uint8 cache of the decoded dataset: auto (default location), none, or a folder")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split; stored in the checkpoint")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=["resnet50", "vit_tiny", "vit_small", "vit_base"],
                   help="backbone (resnet50; demo vit_tiny)")
    g.add_argument("--patch-size", type=int, default=None, help="ViT patch size (16)")
    g.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the arch's 12; tests use 2)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "triton"], help="ViT attention kernel")
    g.add_argument("--proj-hidden", type=int, default=None, help="global projector hidden width (2048; demo 512)")
    g.add_argument("--proj-dim", type=int, default=None, help="global projector output (256; demo 128)")
    g.add_argument("--local-hidden", type=int, default=None, help="local head hidden width (2048; demo 512)")
    g.add_argument("--local-bottleneck", type=int, default=None, help="local head bottleneck (256; demo 128)")
    g.add_argument("--local-out", type=int, default=None, help="local head prototypes (2048; demo 512)")
    g = p.add_argument_group("masking (section III-B)")
    g.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of grid cells masked (ceil: 30 of 49)")
    g.add_argument("--mask-patch-size", type=int, default=None, help="mask cell size in pixels (32; demo 16)")
    g = p.add_argument_group("losses (section III-C/D)")
    g.add_argument("--w-mim", type=float, default=1.0, help="weight of the MIM loss")
    g.add_argument("--w-global", type=float, default=1.0, help="weight of the global contrastive loss")
    g.add_argument("--w-local", type=float, default=1.0, help="weight of the local distillation loss")
    g.add_argument("--w-freq", type=float, default=1.0, help="weight of the focal frequency term inside MIM")
    g.add_argument("--moco-temp", type=float, default=0.2, help="InfoNCE temperature")
    g.add_argument("--queue-size", type=int, default=None, help="MoCo queue length (65536; demo 4096)")
    g.add_argument("--local-pairs", type=int, default=20, help="matched cells kept per image and direction (at most all)")
    g.add_argument("--student-temp", type=float, default=0.1, help="local-loss student temperature")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="initial teacher temperature")
    g.add_argument("--teacher-temp", type=float, default=0.07, help="final teacher temperature")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=50, help="linear teacher-temp warm-up")
    g.add_argument("--center-momentum", type=float, default=0.9, help="EMA momentum of the local centre")
    g.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA momentum, cosine to 1")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adan", choices=["adan", "adamw"], help="Adan (official) or AdamW")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (200; demo 3)")
    g.add_argument("--batch-size", type=int, default=None, help="batch per process (64; demo 32)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (default blr * total batch / 256)")
    g.add_argument("--blr", type=float, default=0.004, help="peak lr per 256 images")
    g.add_argument("--weight-decay", type=float, default=0.02, help="decoupled weight decay (none on 1-D)")
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up from 1%% of peak (10; demo 1)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (runs/cmid_<data>)")
    g.add_argument("--resume", default=None, help="checkpoint path or 'auto' (OUT/checkpoint.pth when it exists)")
    g.add_argument("--save-every", type=float, default=10, metavar="MINUTES", help="checkpoint every MINUTES "
                   "(0: only at the end); also at the end, at --max-steps and on SIGTERM/SIGUSR1")
    g.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS", help="20-NN accuracy of the teacher "
                   "every EPOCHS epochs into log.jsonl and curves.png (default: about 5 per run; 0: off)")
    g.add_argument("--eval-only", default=None, metavar="CKPT",
                   help="evaluate CKPT: data, split and model from the checkpoint; results beside it unless --out")
    g.add_argument("--export", default=None, metavar="CKPT",
                   help="write the backbone of CKPT with timm names to backbone.pth beside it unless --out")
    g.add_argument("--visualize", default=None, metavar="CKPT", help="write visualize.png for CKPT beside it unless --out")
    g.add_argument("--bench", type=int, default=0, metavar="STEPS", help="time STEPS steps on random tensors")
    g.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="autocast (bf16 on CUDA)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, augmentation and order (offset by rank)")
    g.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    g.add_argument("--eval-feat", default="cls", choices=["cls", "cls+avg"],
                   help="ViT evaluation features: final-norm [CLS], or [CLS] + mean patch token (ResNet: GAP)")
    return p


MODEL_KEYS = ("arch", "patch_size", "depth", "img_size", "proj_hidden", "proj_dim", "local_hidden", "local_bottleneck",
              "local_out", "mask_patch_size", "mask_ratio", "queue_size")
# What a checkpoint mode takes from its command line instead of the checkpoint: nothing that picks the data, the split
# or the model (--data-root only finds the same files where the dataset moved; the split check below proves it).
CKPT_MODE_FLAGS = ("data_root", "batch_size", "workers", "cache", "attn", "eval_feat", "skip_bad")
RUN_MODES = ("eval_only", "export", "visualize", "out", "amp")   # always this command's (None: beside it, this machine's)


def refuse_differences(keys, args, ck, path, scenes=None):
    """A flag that picks the data split or the model (keys) must be the checkpoint's, and the data found now (scenes)
    must give the checkpoint's train/test split: the dataset may have moved, not changed."""
    saved = ck["args"]
    if diff := [k for k in keys if getattr(args, k) != saved.get(k)]:
        flags = lambda ns: " ".join(f"--{k.replace('_', '-')} {ns[k]}" for k in diff)   # noqa: E731
        raise data.UserError(f"{path} was trained with {flags(saved)}, not {flags(vars(args))}: use the checkpoint's")
    if scenes is not None and ck.get("split", split_signature(scenes)) != split_signature(scenes):
        raise data.UserError(f"{path}: the train/test split of the data found now is not the checkpoint's "
                             f"({saved['data']}): point --data/--data-root at the checkpoint's dataset")


def resolve_args(args, given=(), ckpt=None):
    """Fill the None sentinels: the paper's settings with --data, the CPU demo without it. In a checkpoint mode (ckpt)
    the data, split and model come from the checkpoint; a given --data, --split-seed or model flag must agree."""
    path = args.export or args.eval_only or args.visualize   # those write beside their checkpoint
    if ckpt is not None:
        refuse_differences(sorted(set(given) & {"data", "split_seed", *MODEL_KEYS}), args, ckpt, path)
        args = argparse.Namespace(**{**vars(args), **ckpt["args"], "resume": None, "bench": 0,
                                     **{k: getattr(args, k) for k in CKPT_MODE_FLAGS + RUN_MODES if k in given or k in RUN_MODES}})
    demo = args.data is None
    paper = dict(synthetic_images=1000, img_size=224, arch="resnet50", patch_size=16, proj_hidden=2048,
                 proj_dim=256, local_hidden=2048, local_bottleneck=256, local_out=2048,
                 mask_patch_size=32, queue_size=65536, epochs=200, batch_size=64, warmup_epochs=10)
    small = dict(synthetic_images=500, img_size=64, arch="vit_tiny", patch_size=16, proj_hidden=512,
                 proj_dim=128, local_hidden=512, local_bottleneck=128, local_out=512,
                 mask_patch_size=16, queue_size=4096, epochs=3, batch_size=32, warmup_epochs=1)
    for k, v in (small if demo else paper).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.data = args.data or "synthetic"
    args.eval_every = max(1, args.epochs // 5) if args.eval_every is None else args.eval_every
    args.out = args.out or (str(Path(path).parent) if path else f"runs/cmid_{Path(args.data).name}")
    args.amp = args.amp or ("bf16" if torch.cuda.is_available() else "none")
    base = 4 if args.arch == "resnet50" else args.patch_size   # the resolution where the mask token is added
    if args.img_size % 32 or args.img_size % args.mask_patch_size or args.mask_patch_size % base or 32 % base:
        raise data.UserError(f"--img-size must be a multiple of 32 and of --mask-patch-size, itself a multiple of {base}, a divisor of 32")
    return args


# ---------------------------------------------------------------------------------------- model
class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (stride on the 3x3 conv, 'v1.5'), same module names."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 without fc; state_dict keys equal torchvision's (conv1, bn1, layer1..4)."""
    stride, mask_stride, embed_dim, mask_dim = 32, 4, 2048, 64   # mask token: 64-ch stem output

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, Bottleneck):   # timm's resnet50, the official backbone: zero_init_last, so
                nn.init.zeros_(m.bn3.weight)   # every residual branch starts as the identity

    def _make_layer(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, mask=None, mask_token=None):
        """-> (global feature [B,2048] = GAP, feature map [B,2048,H/32,W/32])."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if mask is not None:   # section III-B: learnable token added where masked (stem output)
            x = x + mask_token.to(x.dtype) * mask.unsqueeze(1).to(x.dtype)
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return fmap.float().mean((2, 3)), fmap


class Attention(nn.Module):
    def __init__(self, dim, heads, backend="sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.backend == "triton":   # lazy: --attn sdpa runs never import triton
            from kernels.attention import masked_attention
            x = masked_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim, heads, backend):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Plain ViT with timm's module names (patch_embed.proj, cls_token, pos_embed, blocks.i, norm)."""

    def __init__(self, img_size, patch, dim, depth, heads, backend="sdpa"):
        super().__init__()
        self.stride = self.mask_stride = patch
        self.embed_dim = self.mask_dim = dim
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(3, dim, patch, patch)))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, mask=None, mask_token=None):
        """-> (global feature [B,D] = final-norm [CLS], patch-token map [B,D,H/p,W/p])."""
        x = self.patch_embed(x)                                   # [B,D,h,w]
        if mask is not None:   # section III-B: learnable token added to masked patch embeddings
            x = x + mask_token.to(x.dtype) * mask.unsqueeze(1).to(x.dtype)
        B, D, h, w = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0].float(), x[:, 1:].transpose(1, 2).reshape(B, D, h, w)


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def build_backbone(args):
    if args.arch == "resnet50":
        return ResNet50()
    dim, depth, heads = VIT_SIZES[args.arch]
    return VisionTransformer(args.img_size, args.patch_size, dim, args.depth or depth, heads, args.attn)


class LocalHead(nn.Module):
    """Section III-D: per-cell DINO head, Conv1d over the matched cells (official contrastive_utils.LocalHead)."""

    def __init__(self, dim, hidden, bottleneck, out):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Conv1d(hidden, hidden, 1), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Conv1d(hidden, bottleneck, 1))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Conv1d(bottleneck, out, 1, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)   # DINO: norm fixed at 1
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, cells):                                       # [B,C,k] -> [B,out,k]
        x = self.mlp(cells)
        with torch.autocast(x.device.type, enabled=False):   # fp32 logits: T 0.04 magnifies bf16 rounding 25x
            return self.last_layer(F.normalize(x.float(), dim=1))


class Encoder(nn.Module):
    """What student and teacher share (and the EMA averages): backbone + global and local heads."""

    def __init__(self, args):
        super().__init__()
        self.backbone = build_backbone(args)
        C = self.backbone.embed_dim
        # section III-C: MoCo-v2 projector on the global feature, Linear-ReLU-Linear, then L2
        self.projector = nn.Sequential(nn.Linear(C, args.proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(args.proj_hidden, args.proj_dim))
        self.local_head = LocalHead(C, args.local_hidden, args.local_bottleneck, args.local_out)

    def forward(self, x, cells=None, mask=None, mask_token=None):
        """cells [B,k]: indices on the stride-32 grid fed to the local head (None: no local output)."""
        feat, fmap = self.backbone(x, mask, mask_token)
        loc = None if cells is None else self.local_head(local_cells(fmap, self.backbone.stride, cells))
        return F.normalize(self.projector(feat).float(), dim=-1), loc, fmap


def local_cells(fmap, stride, cells):
    """[B,C,h,w] map, [B,k] flat cell indices on the stride-32 grid -> [B,C,k]. Every backbone's local branch
    works on that grid: a ViT/16 map (14x14 at 224 px) is average-pooled to ResNet's 7x7 (20 of 49 cells matched)."""
    x = (F.avg_pool2d(fmap, 32 // stride) if stride < 32 else fmap).flatten(2)
    return x.gather(2, cells.unsqueeze(1).expand(-1, x.shape[1], -1))


class Student(nn.Module):
    """Encoder + the student-only parts: the mask token and the pixel MIM head (section III-B)."""

    def __init__(self, args):
        super().__init__()
        self.encoder = Encoder(args)
        bb = self.encoder.backbone
        self.mask_token = nn.Parameter(torch.zeros(1, bb.mask_dim, 1, 1))
        s = bb.stride   # Conv1x1(C, 3*s*s) + PixelShuffle(s): one s x s RGB patch per map cell
        self.mim_head = nn.Sequential(nn.Conv2d(bb.embed_dim, 3 * s * s, 1), nn.PixelShuffle(s))

    def forward(self, x, mask, cells=None):
        """mask: bool [B,g,g] on the mask grid -> (global q, local logits of `cells`, reconstruction)."""
        r = x.shape[-1] // self.encoder.backbone.mask_stride // mask.shape[-1]
        m = mask.repeat_interleave(r, 1).repeat_interleave(r, 2)   # grid -> token/stem resolution
        q, loc, fmap = self.encoder(x, cells, m, self.mask_token)
        return q, loc, self.mim_head(fmap).float()


# -------------------------------------------------------------------------------------- masking
def random_grid_masks(batch, grid, ratio, device):
    """Section III-B: per image, exactly ceil(ratio*grid^2) cells (30 of 49), uniform. -> bool [B,g,g]."""
    ranks = torch.rand(batch, grid * grid, device=device).argsort(1).argsort(1)   # a random permutation
    return (ranks < math.ceil(ratio * grid * grid)).view(batch, grid, grid)


def pixel_mask(mask, size):
    """Cell mask [B,g,g] -> float pixel mask [B,1,size,size] (1 = masked)."""
    r = size // mask.shape[-1]
    return mask.repeat_interleave(r, 1).repeat_interleave(r, 2).unsqueeze(1).float()


def mean_fill(images, mpix):
    """Masked pixels take the image's per-channel mean (of the normalised view)."""
    mean = images.mean((2, 3), keepdim=True)
    return images * (1 - mpix) + mean * mpix


# --------------------------------------------------------------------------------------- losses
def focal_l1_loss(pred, target, mpix):
    """Section III-B spatial term: |d| * (2 sigmoid(0.2|d|) - 1), mean over masked pixels."""
    d = (pred - target).abs()
    return (d * (2 * torch.sigmoid(0.2 * d) - 1) * mpix).sum() / (mpix.sum() * pred.shape[1]).clamp(min=1)


def focal_frequency_loss(pred, target, mpix):
    """Section III-B frequency term as the official head builds it (mim_utils.MIMLossHead "mixed", fft_unmask_weight
    0.001; loss_utils.FocalFrequencyLoss alpha 1, ave_spectrum, log_matrix, batch_matrix): off the mask the prediction
    is 0.001*pred + 0.999*(0.5*sg(pred) + 0.5*x); spectra are averaged over the mini-batch BEFORE the difference,
    and the focal weight log(1+|F(p)-F(x)|) is normalised by one batch-wide maximum, without gradient."""
    keep = mpix + (1 - mpix) * 0.001
    comp = pred * keep + (0.5 * pred.detach() + 0.5 * target) * (1 - keep)
    diff = torch.fft.fft2(comp, norm="ortho").mean(0) - torch.fft.fft2(target, norm="ortho").mean(0)
    dist2 = diff.real ** 2 + diff.imag ** 2                           # [C,H,W]
    w = torch.log1p(dist2.detach().sqrt())                            # the focal weight, no gradient
    return (w / w.max().clamp(min=1e-12) * dist2).mean()


def infonce_loss(q, k, queue, temp, own=None):
    """MoCo-v2 InfoNCE: positive = teacher key of the other view, negatives = the queue, except the
    entries where own [B,K] is True (keys of the query's own image, see MethodState)."""
    neg = q @ queue.t().to(q.dtype)
    neg = neg if own is None else neg.masked_fill(own, float("-inf"))
    logits = torch.cat([(q * k).sum(1, keepdim=True), neg], 1) / temp
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def cell_centres(boxes, hflip, grid):
    """Centres of a view's grid x grid cells in ORIGINAL-image pixels -> [B, grid*grid, 2] (x, y).

    boxes [B,4] = (x0,y0,x1,y1) of the crop in input pixels; a flipped view's column c shows the
    crop's column grid-1-c. (The official code matched fractional offsets; this uses real boxes.)"""
    t = (torch.arange(grid, device=boxes.device, dtype=torch.float32) + 0.5) / grid
    v, u = torch.meshgrid(t, t, indexing="ij")                       # row fraction, column fraction
    u, v = u.reshape(1, -1), v.reshape(1, -1)
    u = torch.where(hflip.view(-1, 1), 1 - u, u)
    x = boxes[:, :1] + u * (boxes[:, 2:3] - boxes[:, :1])
    y = boxes[:, 1:2] + v * (boxes[:, 3:4] - boxes[:, 1:2])
    return torch.stack([x, y], -1)


def match_cells(centres, partner_centres, k):
    """Section III-D, the official rule (contrastive_utils.position_match): every cell takes its nearest
    cell of the other view; the k cells (at most all N) with the nearest partners are kept.
    centres [B,N,2] -> (cells, partners) [B,k] x 2. Called once per direction."""
    near, partner = torch.cdist(centres, partner_centres).min(2)       # [B,N] each
    cells = near.topk(min(k, near.shape[1]), dim=1, largest=False).indices
    return cells, partner.gather(1, cells)


def local_distill_loss(s, t, centre, student_temp, teacher_temp):
    """DINO cross-entropy over matched cells: s, t [B, out, P]; centre [1, out, 1]."""
    tp = F.softmax((t - centre) / teacher_temp, dim=1)
    return -(tp * F.log_softmax(s / student_temp, dim=1)).sum(1).mean()


def local_loss(directions, state, student_temp, teacher_temp, momentum):
    """Mean over the (student, teacher) directions; as the official LocalLoss, each direction updates the
    centre from its matched teacher outputs right after its loss, so the second one sees the first's update."""
    total = 0.0
    for s, t in directions:
        total = total + local_distill_loss(s, t, state.centre, student_temp, teacher_temp) / len(directions)
        state.update_centre(t, momentum)
    return total


class MethodState(nn.Module):
    """The MoCo key queue (ring buffer) with each key's image id, and the local-loss centre. The ids keep a query's own
    image out of its negatives: 65,536 keys span ~4.3 epochs of AID at 8 x 64 per step, ~40 of UCM."""

    def __init__(self, queue_size, key_dim, local_out, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)   # identical on all ranks
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, key_dim, generator=g), dim=1))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))   # -1: random init key
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("centre", torch.zeros(1, local_out, 1))

    @torch.no_grad()
    def enqueue(self, keys, ids):
        """keys [n, D], ids [n] (already gathered from all ranks, each key once): overwrite the oldest."""
        K = self.queue.shape[0]
        if keys.shape[0] > K:
            self.queue_ptr.add_(keys.shape[0] - K).remainder_(K)
            keys, ids = keys[-K:], ids[-K:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % K
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ids[idx] = ids.to(self.queue_ids.device)
        self.queue_ptr.add_(keys.shape[0]).remainder_(K)

    @torch.no_grad()
    def update_centre(self, t, momentum):
        """t [B, out, k] matched teacher local logits; mean over images and cells, all ranks."""
        mean = all_reduce_mean(t.float().mean((0, 2)).view(1, -1, 1), dist.get_world_size() if dist.is_initialized() else 1)
        self.centre.mul_(momentum).add_(mean, alpha=1 - momentum)


def all_reduce_mean(t, world):
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


def gather_keys(t):
    """One all-gather per step of the (already concatenated) keys of both views, and once of their ids."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def cmid_step_losses(student, teacher, state, v1, v2, p1, p2, masks, ids, teacher_temp, args):
    """All CMID losses for one batch of two views; ids [B] identify the images (queue); updates the local centre.
    -> (dict of losses, the teacher keys to enqueue: view 2's then view 1's, the official order)."""
    mp = [pixel_mask(m, v1.shape[-1]) for m in masks]
    grid = v1.shape[-1] // 32
    c1, c2 = cell_centres(p1["boxes"], p1["hflip"], grid), cell_centres(p2["boxes"], p2["hflip"], grid)
    i1, j2 = match_cells(c1, c2, args.local_pairs)   # student view-1 cells and their nearest view-2 cells
    i2, j1 = match_cells(c2, c1, args.local_pairs)   # and the other direction
    with autocast(args, v1.device):   # the networks in bf16; every loss below in fp32 (their inputs are fp32)
        with torch.no_grad():   # teacher: both views, unmasked
            k1, t1, _ = teacher(v1, j1)
            k2, t2, _ = teacher(v2, j2)
        q1, s1, r1 = student(mean_fill(v1, mp[0]), masks[0], i1)
        q2, s2, r2 = student(mean_fill(v2, mp[1]), masks[1], i2)
    views = ((r1, v1, mp[0]), (r2, v2, mp[1]))
    l_l1 = sum(focal_l1_loss(r, v, m) for r, v, m in views) / 2
    l_ffl = sum(focal_frequency_loss(r, v, m) for r, v, m in views) / 2
    l_mim = l_l1 + args.w_freq * l_ffl
    own = ids.view(-1, 1) == state.queue_ids.view(1, -1)
    l_global = 0.5 * (infonce_loss(q1, k2, state.queue, args.moco_temp, own)
                      + infonce_loss(q2, k1, state.queue, args.moco_temp, own))
    l_local = local_loss(((s1, t2), (s2, t1)), state, args.student_temp, teacher_temp, args.center_momentum)
    total = args.w_mim * l_mim + args.w_global * l_global + args.w_local * l_local
    losses = {"loss": total, "mim": l_mim, "l1": l_l1, "ffl": l_ffl, "global": l_global, "local": l_local}
    return losses, torch.cat([k2, k1]).detach()


# ------------------------------------------------------------------------ teacher / optimiser
@torch.no_grad()
def ema_update(student_encoder, teacher, m):
    """Teacher <- m * teacher + (1-m) * student over backbone + projector + local head params."""
    tp = list(teacher.parameters())
    torch._foreach_mul_(tp, m)
    torch._foreach_add_(tp, list(student_encoder.parameters()), alpha=1 - m)


class Adan(torch.optim.Optimizer):
    """Adan (Xie et al. 2022, arXiv 2208.06677, Alg. 1) with its proximal decoupled weight decay.

    g_k gradient, d_k = g_k - g_{k-1} (0 at the first step):
      m_k = b1 m + (1-b1) g_k;  v_k = b2 v + (1-b2) d_k;  n_k = b3 n + (1-b3) (g_k + b2 d_k)^2
      u_k = (m_k/(1-b1^k) + b2 v_k/(1-b2^k)) / (sqrt(n_k/(1-b3^k)) + eps)
      theta <- (theta - lr u_k) / (1 + lr wd)      (Alg. 1; the official code's default, no_prox=False)
    (betas written as the official code's 0.98/0.92/0.99, i.e. 1 - the paper's beta.)"""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):   # one fused (foreach) update per parameter group, no per-tensor Python math
        for group in self.param_groups:
            (b1, b2, b3), lr = group["betas"], group["lr"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:   # d_1 = 0: the first "previous gradient" is g_1 itself
                    self.state[p].update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                         n=torch.zeros_like(p), prev_grad=p.grad.clone())
                self.state[p]["step"] += 1
            if not params:
                continue
            k = self.state[params[0]]["step"]
            m, v, n, prev = ([self.state[p][key] for p in params] for key in ("m", "v", "n", "prev_grad"))
            g = [p.grad for p in params]
            d = torch._foreach_sub(g, prev)                                   # d_k = g_k - g_{k-1}
            torch._foreach_lerp_(m, g, 1 - b1)                                # m = b1 m + (1-b1) g
            torch._foreach_lerp_(v, d, 1 - b2)                                # v = b2 v + (1-b2) d
            u = torch._foreach_add(g, d, alpha=b2)                            # g + b2 d
            torch._foreach_lerp_(n, torch._foreach_mul(u, u), 1 - b3)          # n = b3 n + (1-b3) u^2
            denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(n, 1 - b3 ** k)), group["eps"])
            update = torch._foreach_div(m, 1 - b1 ** k)
            torch._foreach_add_(update, v, alpha=b2 / (1 - b2 ** k))
            torch._foreach_div_(update, denom)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_div_(params, 1 + lr * group["weight_decay"])      # decoupled (proximal) weight decay
            torch._foreach_copy_(prev, g)


def param_groups(model, weight_decay):
    """Weight decay on every parameter of 2+ dims, the mask token included (the official optimiser is timm's
    create_optimizer_v2 with filter_bias_and_bn: only 1-D tensors are exempt); not on biases, norms, and the
    ViT's [CLS] and position embedding (timm's ViT no_weight_decay; the official code has no ViT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(s in name for s in ("cls_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, args):
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "adan":
        return Adan(groups, lr=args.lr)
    fused = {"fused": True} if torch.cuda.is_available() else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), **fused)


# ------------------------------------------------------------------------------------ schedules
def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-step array: linear warm-up from warmup_start to base, then cosine from base to final."""
    warm = np.linspace(warmup_start, base, warmup_epochs * steps_per_epoch, endpoint=False)
    n = epochs * steps_per_epoch - len(warm)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(n) / max(1, n)))
    return np.concatenate([warm, cos])


# ----------------------------------------------------------------------------------- train loop
def setup_distributed():   # device first, so NCCL binds each rank to its own GPU; the long timeout lets
    cuda = torch.cuda.is_available()   # the other ranks wait while rank 0 evaluates
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:   # the official code's cudnn autotuning; TF32 for the fp32 heads, losses and evaluation
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    return device


# View 2's photometric ops, batched, on [0,1] images, as the official albumentations 1.2.1 pipeline
# (Dataset/transform.py get_contrastive_transform) draws them per image.
def draw(x, p):
    return (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)


def blur_params(batch, device):
    """A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2), p=1): kernel size randrange(3, 8), an even draw
    moved to the next odd size (3: 1/5, 5: 2/5, 7: 2/5); sigma U(0.1, 2). -> (sizes, sigmas) [B]."""
    size = torch.randint(3, 8, (batch,), device=device)
    return size + (size % 2 == 0), torch.empty(batch, device=device).uniform_(0.1, 2.0)


def gaussian_blur(x, size, sigma):
    """cv2.GaussianBlur with a per-image kernel size and sigma: separable, reflect-101 border."""
    B, C, H, W = x.shape
    t = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma[:, None] ** 2)) * (t.abs() <= size[:, None] // 2)   # 7 taps, 0 past the size
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)
    y = F.conv2d(F.pad(x.reshape(1, B * C, H, W), [3] * 4, mode="reflect"), k[:, None, :, None], groups=B * C)
    return F.conv2d(y, k[:, None, None, :], groups=B * C).view(B, C, H, W)


def gauss_noise(x, p=0.6):
    """A.GaussNoise(p=0.6): variance U(10, 50) on the uint8 scale (sigma 0.012-0.028 here), per pixel and channel."""
    sigma = torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(10, 50).sqrt() / 255
    return (x + torch.randn_like(x) * sigma * draw(x, p)).clamp(0, 1)


def solarize(x, p=0.2):
    """A.Solarize(p=0.2): uint8 values >= 128 become 255 - v."""
    return torch.where(draw(x, p) & (x >= 128 / 255), 1 - x, x)


def to_gray(x, p=0.2):
    """A.ToGray(p=0.2): cv2 RGB2GRAY weights, repeated over the 3 channels."""
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
    return torch.where(draw(x, p), gray, x)


def build_views(args, device):
    """Section III-A: both views RRC(0.3-1) + hflip; view 2 then jitter, blur, noise, solarise, gray, in the
    official order. -> two callables uint8 [B,3,H,W] -> (normalised view, params with "boxes", "hflip")."""
    common = dict(scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, gray_p=0.0)
    aug1 = data.BatchAugment(args.img_size, jitter_p=0.0, mean=CMID_MEAN, std=CMID_STD, **common).to(device)
    crop_jitter = data.BatchAugment(args.img_size, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                                    mean=(0, 0, 0), std=(1, 1, 1), **common).to(device)

    def aug2(x):
        v, params = crop_jitter(x)
        v = to_gray(solarize(gauss_noise(gaussian_blur(v, *blur_params(len(v), v.device)))))
        return data.normalize(v, CMID_MEAN, CMID_STD), params
    return aug1, aug2


def build_models(args, device, world):
    torch.manual_seed(args.seed)   # same initial weights on every rank
    student = match_grad_layout(Student(args))
    teacher = copy.deepcopy(student.encoder)
    state = MethodState(args.queue_size, args.proj_dim, args.local_out, args.seed)
    if device.type == "cuda" and world > 1:   # every BatchNorm (ResNet's, the local head's) on the global batch
        student, teacher = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (student, teacher))
    if args.arch == "resnet50" and device.type == "cuda":   # channels-last convs
        student, teacher = (m.to(memory_format=torch.channels_last) for m in (student, teacher))
    teacher.requires_grad_(False)
    return student.to(device), teacher.to(device), state.to(device)


def match_grad_layout(student):
    """Store the heads' 1x1-conv weights [out, in, 1(, 1)] channels-last (the same memory order): a convolution returns a
    channels-last weight gradient whenever its input or weight is channels-last, as the ViT map (a transposed token view)
    and the CUDA ResNet map are. DDP needs gradient strides = parameter strides, else it warns 'grad strides do not
    match bucket view strides' and copies the gradient every step."""
    for name, m in student.named_modules():   # (the weight-normed last layer's gradient comes out of its norm, contiguous)
        if isinstance(m, nn.Conv1d | nn.Conv2d) and set(m.kernel_size) == {1} and not name.startswith("encoder.backbone") \
                and not nn.utils.parametrize.is_parametrized(m):
            w = m.weight
            w.data = torch.empty_strided(w.shape, (w.shape[1], 1) + (w.shape[1],) * (w.dim() - 2)).copy_(w.data)
    return student


def autocast(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(student, teacher, state, optimizer, scaler, images, ids, aug, sched, step, args, device):
    """One optimisation step on a uint8 batch and its image ids [B]; returns the (device) loss dict, no host sync."""
    for g in optimizer.param_groups:
        g["lr"] = sched["lr"][step]
    x = images.to(device, non_blocking=True)
    v1, p1 = aug[0](x)
    v2, p2 = aug[1](x)
    if args.arch == "resnet50" and device.type == "cuda":
        v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
    grid = args.img_size // args.mask_patch_size
    masks = [random_grid_masks(x.shape[0], grid, args.mask_ratio, device) for _ in range(2)]
    ids = ids.to(device)
    losses, keys = cmid_step_losses(student, teacher, state, v1, v2, p1, p2, masks, ids, sched["teacher_temp"][step], args)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    ema_update(unwrap(student).encoder, teacher, sched["momentum"][step])
    state.enqueue(gather_keys(F.normalize(keys.float(), dim=1)), gather_keys(torch.cat([ids, ids])))
    return {k: v.detach() for k, v in losses.items()}


def rng_states(device):   # this rank's streams: python, numpy, torch CPU and its own GPU
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(s, device):   # .cpu(): torch.set_rng_state rejects a state that was loaded onto a GPU
    random.setstate(s["python"]), np.random.set_state(s["numpy"]), torch.set_rng_state(s["torch"].cpu())
    torch.cuda.set_rng_state(s["cuda"].cpu(), device) if s["cuda"] is not None and device.type == "cuda" else None


def wrap_ddp(student, device):
    """DDP without its per-forward buffer sync, which rewrote BatchNorm stats saved for backward by the student's first
    call (one per view; torch 2.11 raises). No loss reads running stats; SyncBatchNorm keeps them equal. torch 2.13
    renamed the flag (forward_sync_buffers)."""
    DDP = nn.parallel.DistributedDataParallel
    flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(student, device_ids=[device.index] if device.type == "cuda" else None, **{flag: False})


def unwrap(m):   # the plain module under torch.compile and DDP
    return getattr(getattr(m, "_orig_mod", m), "module", getattr(m, "_orig_mod", m))


def load_run_checkpoint(path):
    """A cmid.py checkpoint, on the CPU (data.load_checkpoint); another script's is a UserError that names it."""
    ck = data.load_checkpoint(path)
    if (script := ck.get("script", "cmid.py" if {"teacher", "state"} <= ck.keys() else "another script")) != "cmid.py":
        raise data.UserError(f"{path} is a checkpoint of {script}, not of cmid.py: pass one written by cmid.py")
    ck["args"].setdefault("split_seed", ck["args"]["seed"])   # before --split-seed, --seed drew the split
    return ck


def split_signature(scenes):
    """What a checkpoint must agree with: classes and the train/test files (not where they live)."""
    record = [scenes.classes] + [[scenes.all_samples[i] for i in scenes.splits[s]] for s in ("train", "test")]
    return hashlib.sha1(json.dumps(record).encode()).hexdigest()


def read_log(folder):
    path = Path(folder) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_log(out, records):   # log.jsonl (whole, atomically) and curves.png
    (tmp := Path(out) / "log.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, Path(out) / "log.jsonl")
    floor = next((r["knn_floor"] for r in records if "knn_floor" in r), None)
    data.plot_curves([r for r in records if "time_s" in r], Path(out) / "curves.png", floor)


def knn_now(backbone, loaders, args, device):
    """The final table's 20-NN accuracy of a backbone now (rank 0), leaving the RNG streams and the train mode as they
    were: an evaluation never changes the training that follows it."""
    mode = backbone.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        (xtr, ytr), (xte, yte) = (extract_features(backbone, loaders[s], device, args) for s in ("train", "test"))
    backbone.train(mode)
    return knn_classify(xtr, ytr, xte, yte, len(loaders["test"].dataset.classes))


def scene_loader(args, split, train=False, **override):
    """Training: --load-size images, shuffled and sharded over the ranks, for the random crops. Evaluation: whole
    images resized to --img-size (no crop), in order, on one process."""
    kw = dict(size=args.load_size if train else args.img_size, batch_size=args.batch_size, shuffle=train,
              drop_last=train, distributed=None if train else False, seed=args.seed, split_seed=args.split_seed,
              workers=args.workers, cache=args.cache, synthetic_images=args.synthetic_images, skip_bad=args.skip_bad)
    return data.build_loader(args.data, args.data_root, split, **{**kw, **override})


def batches_with_ids(loader):
    """(images, ids) per batch: ids = positions in the train split, from the loader's own (deterministic per epoch)
    batch sampler; iter(loader) runs now, not at the first next(), so the caller's fork_rng covers it."""
    return ((images, torch.as_tensor(pos, dtype=torch.long)) for (images, _), pos in zip(iter(loader), loader.sampler))


def train(args, device, rank, world):
    """Pretrain -> (teacher, student), or None when preempted (checkpoint saved). Checkpoints every --save-every
    minutes, at the end, at --max-steps and on SIGTERM/SIGUSR1; --resume auto continues exactly from any of them."""
    out, ck_path = Path(args.out), Path(args.out) / "checkpoint.pth"
    args.load_size = data.resolve_load_size(args.data, args.data_root, args.img_size, args.load_size,
                                            args.synthetic_images)   # native size, at most 2x --img-size
    loader = scene_loader(args, "train", train=True)
    scenes, steps_per_epoch = loader.dataset.scenes, len(loader)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)
    if steps_per_epoch == 0:
        raise data.UserError(f"{args.data}: fewer training images than --batch-size {args.batch_size} x {world} ranks")
    resume = ck_path if args.resume == "auto" and ck_path.is_file() else None if args.resume == "auto" else args.resume
    if ck := load_run_checkpoint(resume) if resume else None:
        refuse_differences(MODEL_KEYS + ("split_seed",), args, ck, resume, scenes)
    if rank == 0:
        data.save_splits(scenes, out / "splits.json")
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    student, teacher, state = build_models(args, device, world)
    optimizer, scaler = build_optimizer(student, args), torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    sched = {"lr": cosine_schedule(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs, 0.01 * args.lr),
             "momentum": cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch),
             "teacher_temp": np.interp(np.arange(steps_per_epoch * args.epochs), [0, args.warmup_teacher_temp_epochs *
                                       steps_per_epoch], [args.warmup_teacher_temp, args.teacher_temp])}   # then constant
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    step, seen, sums, records, clock = 0, 0, None, [], time.time()   # clock: when training began, evaluations left out
    if ck:
        for name, obj in dict(student=student, teacher=teacher, state=state, optimizer=optimizer, scaler=scaler).items():
            obj.load_state_dict(ck[name])
        step, seen, clock = ck["global_step"], ck["images_seen"], clock - ck["time_s"]
        if rank < len(ck["ranks"]):   # a rank the saved run did not have keeps its fresh seed + rank streams
            set_rng_states(ck["ranks"][rank]["rng"], device)
            sums = ck["ranks"][rank]["sums"]
        records = [r for r in read_log(out) if r.get("step", 0) <= step]   # drop what the lost steps logged
        print(f"resumed from {resume}: epoch {step // steps_per_epoch + 1} step {step % steps_per_epoch}") if rank == 0 else None
    eval_loaders = {s: scene_loader(args, s) for s in ("train", "test")} if args.eval_every and rank == 0 else None
    if eval_loaders and not ck:   # the random-init floor of the curves, the final table's
        floor = random_init_backbone(args, eval_loaders["train"], device)[0]
        records.append({"knn_floor": knn_now(floor, eval_loaders, args, device)})
    write_log(out, records) if rank == 0 else None
    student = wrap_ddp(student, device) if world > 1 else student
    if args.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)
    aug = build_views(args, device)
    writer, points = data.CheckpointWriter(), data.SavePoints(args.save_every, device)

    def save(epoch_sums):
        ranks = [{"rng": rng_states(device), "sums": epoch_sums}] * world   # each rank resumes its own streams
        if world > 1:
            dist.all_gather_object(ranks, ranks[0])
        if rank == 0:
            writer.save(dict(script="cmid.py", student=unwrap(student).state_dict(), teacher=unwrap(teacher).state_dict(),
                             state=state.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                             global_step=step, time_s=time.time() - clock, images_seen=seen,
                             split=split_signature(scenes), args=vars(args), ranks=ranks), ck_path)
            print(f"checkpoint {ck_path} at step {step}: snapshot {writer.snapshot_ms:.0f} ms"
                  + (f" (previous write {writer.write_ms:.0f} ms)" if writer.write_ms else ""), flush=True)

    names = ["loss", "mim", "l1", "ffl", "global", "local"]   # l1 + w_freq * ffl = mim
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step == total_steps:
            break
        loader.sampler.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):   # building the iterator must not move the global RNG
            it = batches_with_ids(loader)
        sums = torch.zeros(len(names) + 1, dtype=torch.float64) if sums is None else sums   # + step count
        sums, t0, first = sums.to(device), time.time(), step % steps_per_epoch
        for i in range(steps_per_epoch):
            images, ids = next(it)
            if i < first:
                continue   # mid-epoch resume: replay the epoch's sampler order, skip the finished steps
            losses = train_step(student, teacher, state, optimizer, scaler, images, ids, aug, sched, step, args, device)
            step, seen = step + 1, seen + images.shape[0] * world
            sums += torch.stack([losses[k].double() for k in names] + [sums.new_ones(())])
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:   # the only host sync of a step
                vals = all_reduce_mean(torch.stack([losses[k].float() for k in names]), world).tolist()
                if not math.isfinite(vals[0]):
                    raise data.UserError(f"loss is {vals[0]} at step {step}: lower --lr / --blr, or use --amp bf16")
                dt = time.time() - t0
                if rank == 0:
                    terms = " ".join(f"{k} {v:.4f}" for k, v in zip(names, vals))
                    print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} {terms} lr "
                          f"{sched['lr'][step - 1]:.2e} img/s {(i + 1 - first) * args.batch_size * world / dt:.1f} "
                          f"eta {dt / (i + 1 - first) * (total_steps - step) / 60:.1f} min", flush=True)
            if i + 1 == steps_per_epoch:   # one JSON line per epoch (means over its steps and ranks), then maybe kNN
                total, at = all_reduce_mean(sums, world), {"epoch": epoch + 1, "step": step,
                                                           "time_s": round(time.time() - clock, 2), "images_seen": seen}
                records.append({**at, **{k: (total[j] / total[-1]).item() for j, k in enumerate(names)},
                                "lr": float(sched["lr"][step - 1])})
                if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                    t_eval = time.time()
                    if rank == 0:
                        records.append({**at, "knn": knn_now(unwrap(teacher).backbone, eval_loaders, args, device)})
                        print(f"epoch {epoch + 1}: 20-NN accuracy {records[-1]['knn']:.2f}%", flush=True)
                    dist.barrier() if world > 1 else None   # the other ranks wait (3 h timeout)
                    clock += time.time() - t_eval
                write_log(out, records) if rank == 0 else None
            save_now, stop = points.check(step)
            if save_now or stop or step == total_steps:
                save(sums.cpu() if i + 1 < steps_per_epoch else None)
            if stop:
                writer.wait()
                print(f"preempted ({points.signal or 'signal on another rank'}): checkpoint {ck_path} at epoch {epoch + 1} "
                      f"step {i + 1}; resume with the same command plus --resume auto", flush=True) if rank == 0 else None
                return None
            if step == total_steps:
                break
        sums = None
    writer.wait()
    if step < steps_per_epoch * args.epochs and rank == 0:
        print(f"stopped at --max-steps {args.max_steps}; checkpoint saved")
    return unwrap(teacher), unwrap(student)


# ------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def extract_features(backbone, loader, device, args):
    """Frozen backbone -> L2-normalised global features (ResNet GAP, ViT final-norm [CLS] [+ mean patch])."""
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        x = data.normalize(images.to(device), CMID_MEAN, CMID_STD)
        with autocast(args, device):
            f, fmap = backbone(x)
        if args.eval_feat == "cls+avg" and args.arch != "resnet50":
            f = torch.cat([f, fmap.float().mean((2, 3))], 1)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def random_init_backbone(args, loader, device):
    """The random-init floor of the curves and of the final table: the backbone training starts from (the seed's
    initial teacher), its BatchNorm statistics re-estimated on loader's images. -> (backbone, whether it has BN)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)   # as build_models: the backbone is the first thing it draws
        backbone = build_backbone(args).to(device)
        return backbone, reestimate_bn(backbone, loader, device)


@torch.no_grad()
def reestimate_bn(model, loader, device):
    """BatchNorm running statistics = cumulative average over one pass of the loader's images (no labels): the
    random-init floor's stats left at 0/1 are an unnormalised network. -> whether there is BatchNorm (ViT: none)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    if bns:
        model.train()
        for images, _ in loader:
            model(data.normalize(images.to(device), CMID_MEAN, CMID_STD))
    model.eval()
    return bool(bns)


def linear_probe(xtr, ytr, xte, yte, n_classes, weight_decay=1e-4, iters=300):
    """Softmax regression on L2-normalised features, full-batch L-BFGS, fixed hyper-parameters
    (L2 penalty 1e-4 * |W|^2, 300 iterations, strong-Wolfe line search); never tuned on test."""
    W, b = torch.zeros(xtr.shape[1], n_classes, requires_grad=True), torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, ytr) + weight_decay * (W ** 2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return 100.0 * ((xte @ W + b).argmax(1) == yte).float().mean().item()


def knn_classify(xtr, ytr, xte, yte, n_classes, k=20, temp=0.07):
    """Weighted k-NN (DINO): cosine similarity, votes exp(sim / T) of the k nearest."""
    correct = 0
    for i in range(0, len(xte), 512):
        sim, idx = (xte[i:i + 512] @ xtr.t()).topk(min(k, len(xtr)), dim=1)
        votes = torch.zeros(len(sim), n_classes).scatter_add_(1, ytr[idx], (sim / temp).exp())
        correct += (votes.argmax(1) == yte[i:i + 512]).sum().item()
    return 100.0 * correct / len(xte)


def evaluate(backbone, args, device):
    """linear@1%, linear@100%, kNN for the trained teacher backbone and a random-init floor."""
    loaders = {s: scene_loader(args, s) for s in ("train", "train1", "test")}
    n_classes = len(loaders["test"].dataset.classes)
    floor, bn_note = random_init_backbone(args, loaders["train"], device)
    models = {"cmid": backbone, "random init": floor}
    results = {}
    for name, model in models.items():
        f = {s: extract_features(model, ld, device, args) for s, ld in loaders.items()}
        (xtr, ytr), (x1, y1), (xte, yte) = f["train"], f["train1"], f["test"]
        results[name] = {"linear@1%": linear_probe(x1, y1, xte, yte, n_classes),
                         "linear@100%": linear_probe(xtr, ytr, xte, yte, n_classes),
                         "knn": knn_classify(xtr, ytr, xte, yte, n_classes)}
    print(f"\nevaluation on {args.data} ({len(loaders['train1'].rows)} / {len(loaders['train'].rows)} "
          f"train, {len(loaders['test'].rows)} test images), top-1 %")
    print(f"{'model':<14}{'linear@1%':>11}{'linear@100%':>13}{'knn':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['linear@1%']:>11.2f}{r['linear@100%']:>13.2f}{r['knn']:>8.2f}")
    if bn_note:
        print("(random init: BatchNorm statistics re-estimated on the train images, no labels)")
    with open(Path(args.out) / "eval.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


# ------------------------------------------------------------------------------------ visualize
@torch.no_grad()
def visualize(student, args, device, n=8):
    """PNG grid, one row per test image: view | masked input | reconstruction | reconstruction pasted."""
    from PIL import Image
    student = student.to(device).eval()
    images, _ = next(iter(scene_loader(args, "test", batch_size=n, workers=0)))
    torch.manual_seed(args.seed)
    v, _ = build_views(args, device)[0](images.to(device))
    mask = random_grid_masks(len(v), args.img_size // args.mask_patch_size, args.mask_ratio, device)
    mp = pixel_mask(mask, args.img_size)
    masked = mean_fill(v, mp)
    _, _, rec = student(masked, mask)
    cols = [v, masked, rec, rec * mp + v * (1 - mp)]
    mean, std = (torch.tensor(t, device=device).view(1, 3, 1, 1) for t in (CMID_MEAN, CMID_STD))
    tiles = [((c * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy() for c in cols]
    grid = np.concatenate([np.concatenate(list(t), 0) for t in tiles], 1)   # rows: images, columns: kinds
    Image.fromarray(grid).save(out := Path(args.out) / "visualize.png")
    print(f"wrote {out} (columns: view, masked input, reconstruction, reconstruction in the masked cells)")


# ---------------------------------------------------------------------------------------- bench
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def bench(args, device, rank, world):
    """--bench N: N training steps on random uint8 images at --load-size (default --img-size), after 3 warm-up steps;
    then the host time per step of the data side (both views' augmentation and the masks), nothing waiting for the GPU."""
    from torch.utils.flop_counter import FlopCounterMode
    student, teacher, state = build_models(args, device, world)
    optimizer, scaler = build_optimizer(student, args), torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    student = wrap_ddp(student, device) if world > 1 else student
    sched = {"lr": np.full(args.bench + 4, args.lr), "momentum": np.full(args.bench + 4, 0.996),
             "teacher_temp": np.full(args.bench + 4, 0.04)}
    aug = build_views(args, device)
    load = args.load_size or args.img_size
    images = torch.randint(0, 256, (args.batch_size, 3, load, load), dtype=torch.uint8, device=device)
    ids = torch.arange(args.batch_size, device=device)
    step = lambda s: train_step(student, teacher, state, optimizer, scaler, images, ids, aug, sched, s, args, device)  # noqa: E731
    with FlopCounterMode(display=False) as fc:   # model FLOPs of one step (eager, forward + backward)
        step(0)
    flops = fc.get_total_flops()
    if args.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(1), step(2), sync()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    t0 = time.time()
    for s in range(3, 3 + args.bench):
        step(s)
    sync()
    step_s = (time.time() - t0) / args.bench
    t0, grid = time.perf_counter(), args.img_size // args.mask_patch_size
    for _ in range(args.bench):
        aug[0](images), aug[1](images), random_grid_masks(args.batch_size, grid, args.mask_ratio, device)
    host_ms = (time.perf_counter() - t0) / args.bench * 1e3
    sync()
    line = (f"bench {args.arch} img {args.img_size} load {load} batch {args.batch_size}x{world} amp {args.amp} attn "
            f"{args.attn} compile {args.compile}: {args.batch_size * world / step_s:.1f} images/s, step "
            f"{1000 * step_s:.1f} ms (data side {host_ms:.1f} ms host time), {flops / args.batch_size / 1e9:.2f} GFLOP/image")
    if device.type == "cuda":
        line += ", TF32 + cudnn.benchmark on"
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        line += f", peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        line += f", MFU {100 * flops / step_s / peak:.1f}% of {name}" if peak else f", MFU n/a ({name})"
    print(line) if rank == 0 else None
    return step_s


# ----------------------------------------------------------------------------------------- main
def checkpoint_mode(ck, args, device):
    """--export, --eval-only, --visualize on one process, with the data, split and model of the checkpoint.
    --export: the teacher backbone under torchvision ResNet / timm ViT key names -> OUT/backbone.pth."""
    path = Path(args.export or args.eval_only or args.visualize)
    if args.export:
        sd = {k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
        torch.save(sd, out := Path(args.out) / "backbone.pth")
        print(f"wrote {out}: {len(sd)} tensors ({ck['args']['arch']}, teacher)")
        return sd
    scenes = data.build_dataset(args.data, args.data_root, "all", seed=args.split_seed, img_size=args.img_size,
                                synthetic_images=args.synthetic_images, skip_bad=args.skip_bad)
    refuse_differences((), args, ck, path, scenes)
    if args.visualize:
        (student := Student(args)).load_state_dict(ck["student"])
        return visualize(student, args, device)
    (enc := Encoder(args)).load_state_dict(ck["teacher"])
    evaluate(enc.backbone.to(device), args, device)
    if records := read_log(path.parent):   # the learning curves of the run that wrote the checkpoint
        write_log(args.out, records)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    demo, path = args.data is None, args.eval_only or args.export or args.visualize
    ck = load_run_checkpoint(path) if path else None
    words = {w.split("=")[0] for w in (sys.argv[1:] if argv is None else argv)}   # the flags given (no abbreviations)
    args = resolve_args(args, {a.dest for a in parser._actions if words & set(a.option_strings)}, ck)
    device = setup_distributed()
    rank, world = data.rank(), data.world_size()
    if args.lr is None:
        args.lr = args.blr * args.batch_size * world / 256   # linear scaling with the total batch
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if ck is not None:
        checkpoint_mode(ck, args, device) if rank == 0 else None
    elif args.bench:
        bench(args, device, rank, world)
    elif (models := train(args, device, rank, world)) and rank == 0:   # None: preempted, checkpoint saved
        teacher, student = models
        if not args.no_eval:
            evaluate(teacher.backbone, args, device)
            if (tta := data.time_to_accuracy(read_log(args.out))) is not None:
                print(f"time to accuracy: {tta:.0f} s (kNN within 1 point of its final value)")
        if demo:
            visualize(student, args, device)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    data.run_main(main)
