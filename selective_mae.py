"""SelectiveMAE: efficient masked image modelling for remote-sensing scenes, in one file.

Paper: Wang et al., "Scaling Efficient Masked Image Modeling on Large Remote Sensing Dataset",
arXiv 2406.11933; official code github.com/Fengxiang23/SelectiveMAE.

An MAE whose encoder sees only K = floor(N(1-m)) patches (m = 0.85: 29 of 196 at 224/16) and whose
decoder reconstructs only R = floor(N r) masked patches (r = 0.25: 49 of 196). The visible set is
chosen by HOG seeds plus progressive semantic token selection (psts_select, curriculum psts_stage:
near -> far -> random over training); the targets are the R masked patches with the highest HOG
energy (select_targets); a CrossMAE cross-attention decoder predicts their normalised pixels.
--adaptive-budget (our extension) gives busy scenes more tokens, padded and hidden by key masks.
--infobatch (official: InfoBatch(dataset, epochs, 0.5, 0.875)): in the first 87.5% of the epochs
half of the below-mean-loss samples are dropped and the kept ones weighted x2; on with --data, off
in the demo. --resume auto continues OUT/checkpoint.pth exactly; --eval-only/--export/--visualize
take data, split and model from the checkpoint and write beside it. Read top to bottom: args ->
model -> selection -> loss -> schedules -> distributed -> InfoBatch -> train -> evaluate ->
visualize -> bench -> main.

Differs from the official code:
- HOG score: the official per-patch score is the mean of a standardised vector, identically 0, so
  its seeds and targets are uniform random (PSTS then grows the seeds by token similarity); here
  it is a real HOG energy (kernels/hog.py), as the paper describes. --target-select random gives
  the official targets (--seed-select random also skips PSTS: MAE masking).
- Curriculum blends are drawn per image and round (equal to the official mix in expectation).
- bf16 autocast on a GPU (official: fp16 + GradScaler, here --amp fp16); both clip gradients at 1.0.
- Crops resized bilinear (antialiased, batched on the device; official: bicubic, PIL), and besides
  horizontal flips also vertical flips and 90-degree turns (p 0.5 each), as for overhead imagery.
- Not a difference: the cross decoder projects keys/values from the encoder width in every block,
  as the official/CrossMAE code does (its unused decoder_embed1 is not reproduced).
- Plain MAE is one flag set away, through the same functions (the throughput baseline).

Launch:
    python selective_mae.py                                   # CPU demo: synthetic, ViT-Tiny, 64 px
    python selective_mae.py --data UCM --data-root ../shared/data --arch vit_small --epochs 100
    torchrun --standalone --nproc_per_node=8 selective_mae.py --data AID --data-root /data
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=run1 selective_mae.py --data AID --data-root /data --resume auto   # on each node
    python selective_mae.py --mask-ratio 0.75 --recon-ratio 0.75 --seed-select random \\
        --target-select random --decoder self                 # plain MAE
    python selective_mae.py --eval-only RUN/checkpoint.pth    # also --export, --visualize
    python selective_mae.py --data synthetic --arch vit_base --batch-size 256 --bench 50
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data  # the repo's data.py: datasets, splits, loaders, batched GPU augmentation

ARCHS = {  # name: (width, depth, heads); decoder (width, heads) per CrossMAE: 256/8 small, 512/16 else
    "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16)}


# ----------------------------------------------------------------------------------------- args
def get_args_parser():
    p = argparse.ArgumentParser("SelectiveMAE", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="AID | NWPU-RESISC45 | UCM | synthetic | folder-per-class "
                   "path. Omitted: a small CPU demo on synthetic data (ViT-Tiny, 64 px, a few epochs), or, with "
                   "--eval-only/--export/--visualize, the checkpoint's data")
    g.add_argument("--data-root", default="./datasets", help="where the named datasets live")
    g.add_argument("--img-size", type=int, default=None, help="crop size (paper 224; demo 64)")
    g.add_argument("--load-size", type=int, default=None,
                   help="decode size the training crops are taken from (default: native, at most 2x --img-size)")
    g.add_argument("--synthetic-images", type=int, default=None, help="size of the synthetic dataset (1000)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split; stored in the checkpoint")
    g.add_argument("--workers", type=int, default=None, help="loader workers per process (8; demo 0)")
    g.add_argument("--cache", default="auto",
                   help="uint8 cache of the decoded dataset: auto (default location), none, or a folder")
    g.add_argument("--skip-bad", action="store_true", help="log and skip unreadable images instead of failing")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=list(ARCHS), help="encoder (paper vit_base; demo vit_tiny)")
    g.add_argument("--depth", type=int, default=None, help="override the encoder depth (tiny tests)")
    g.add_argument("--patch-size", type=int, default=None, help="patch size p (16; demo 8)")
    g.add_argument("--decoder", default="cross", choices=["cross", "self"],
                   help="cross: CrossMAE cross-attention decoder (official); self: MAE self-attention decoder")
    g.add_argument("--decoder-depth", type=int, default=None, help="decoder blocks (8; demo 4)")
    g.add_argument("--decoder-width", type=int, default=None, help="decoder width (512; 256 for vit_tiny/small)")
    g.add_argument("--decoder-heads", type=int, default=None, help="decoder heads (16; 8 for vit_tiny/small)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "triton"],
                   help="attention: torch SDPA, or kernels.attention.masked_attention (Triton on CUDA)")
    g.add_argument("--norm-pix-loss", type=int, default=1, choices=[0, 1], help="per-patch normalised targets")
    g = p.add_argument_group("selection (paper sec. 3.2: partial reconstruction + PSTS)")
    g.add_argument("--mask-ratio", type=float, default=0.85, help="m: the encoder keeps K = floor(N(1-m))")
    g.add_argument("--recon-ratio", type=float, default=0.25, help="r: R = floor(N r) masked patches reconstructed")
    g.add_argument("--seed-select", default="topk", choices=["topk", "sample", "random"],
                   help="PSTS seeds (floor(K/2)): top HOG, sampled from softmax(score/T), or random = MAE "
                   "random masking of all K tokens (PSTS needs semantic seeds, so it is skipped)")
    g.add_argument("--score-temp", type=float, default=1.0, help="T of softmax(z/T) for 'sample' choices, z = "
                   "HOG scores standardised per image (so T means the same on every dataset)")
    g.add_argument("--psts-rounds", type=int, default=2, help="greedy PSTS rounds after the seeds (0: all K seeds)")
    g.add_argument("--target-select", default="topk", choices=["topk", "sample", "random"],
                   help="which masked patches are reconstructed: top HOG, sampled, or random")
    g.add_argument("--adaptive-budget", action="store_true",
                   help="our extension: per image keep the patches whose HOG energy is above the batch "
                   "quantile --budget-quantile (busy scenes get more tokens), padded + key masks")
    g.add_argument("--budget-quantile", type=float, default=None, help="quantile (default: --mask-ratio)")
    g.add_argument("--budget-max", type=float, default=2.0, help="padded length = this x K (capped at N - R)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (paper 800; demo 6)")
    g.add_argument("--batch-size", type=int, default=None, help="per process (paper 256; demo 32)")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--blr", type=float, default=None, help="base lr per 256 images (paper 1.5e-4; demo 5e-3)")
    g.add_argument("--lr-scale", default="rm", choices=["none", "rm", "mr"],
                   help="lr = blr * total_batch/256 * (r/m) (CrossMAE rule), (m/r) or 1")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay (none on 1-D params)")
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up epochs (10; demo 1)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--infobatch", type=int, default=None, choices=[0, 1], help="InfoBatch data pruning, as the "
                   "official main_pretrain.py (paper settings 1; demo 0)")
    g.add_argument("--infobatch-prune", type=float, default=0.5, help="share of the below-mean-loss samples dropped")
    g.add_argument("--infobatch-delta", type=float, default=0.875, help="prune in the first delta * epochs epochs")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (runs/selective_mae_<data>; the checkpoint's folder for "
                   "--eval-only/--export/--visualize)")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' (OUT/checkpoint.pth if present); "
                   "exact: the same per-step losses as an uninterrupted run")
    g.add_argument("--save-every", type=float, default=10, metavar="MINUTES",
                   help="checkpoint every MINUTES of wall clock (0: only at the end and at --max-steps); always "
                   "at the next step after SIGTERM/SIGUSR1, then exit 0")
    g.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS",
                   help="20-NN accuracy every EPOCHS epochs into OUT/log.jsonl and OUT/curves.png (default: about "
                   "5 per run; 0: off)")
    g.add_argument("--eval-only", default=None, metavar="CKPT",
                   help="evaluate CKPT: data, split and model from the checkpoint; results beside it unless --out")
    g.add_argument("--export", default=None, metavar="CKPT",
                   help="write the backbone of CKPT with timm names to backbone.pth beside it unless --out")
    g.add_argument("--visualize", default=None, metavar="CKPT", help="write visualize.png for CKPT beside it unless --out")
    g.add_argument("--bench", type=int, default=0, metavar="STEPS", help="benchmark STEPS steps on random tensors")
    g.add_argument("--no-eval", action="store_true", help="no evaluation after training (smoke runs)")
    g.add_argument("--eval-feat", default="cls", choices=["cls", "cls+avg"], help="evaluation features")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="autocast (bf16 on GPU, none on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, augmentation and selection (+ rank)")
    g.add_argument("--log-every", type=int, default=None, help="log line every N steps (20; demo 5)")
    g.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many steps")
    return p


def parse_args(argv):
    """(args, the flags the command line sets): checkpoint modes take the others from the checkpoint."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS   # parsed again, the namespace holds only what was given
    return args, set(vars(parser.parse_args(argv)))


SCRIPT = "selective_mae.py"   # a checkpoint says which script wrote it
MODEL_KEYS = ("arch", "depth", "patch_size", "img_size", "decoder", "decoder_depth", "decoder_width",
              "decoder_heads", "mask_ratio", "recon_ratio", "seed_select", "psts_rounds", "target_select",
              "adaptive_budget", "budget_quantile", "budget_max", "norm_pix_loss", "epochs")
# what --eval-only/--export/--visualize take from the checkpoint unless given (resolve_args)
CHECKPOINT_DATA_KEYS = ("data", "split_seed", "synthetic_images", "skip_bad", "data_root", "batch_size",
                        "workers", "cache", "seed")


def resolve_args(args, saved=None, explicit=()):
    """Fill None sentinels: paper settings with --data, the CPU demo without (explicit flags win).
    saved = the args of the checkpoint given to --eval-only/--export/--visualize: its data, split and
    model flags are used; an explicit flag wins only where safe (--data-root if the dataset moved,
    --batch-size, --workers, --cache, --seed of the random-init floor); without --out, OUT = its folder."""
    if saved is not None:
        for k in CHECKPOINT_DATA_KEYS:
            if k not in explicit:
                setattr(args, k, saved[k])
            elif k in ("data", "split_seed") and str(getattr(args, k)).lower() != str(saved[k]).lower():
                raise data.UserError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                                     f"{saved[k]}: evaluating another split would put pretraining images in the "
                                     f"test split; leave the flag out")
        for k in MODEL_KEYS:
            setattr(args, k, saved[k])
        args.out = args.out or str(Path(args.eval_only or args.export or args.visualize).parent)
    demo = args.data is None
    defaults = dict(arch="vit_tiny", img_size=64, patch_size=8, epochs=6, batch_size=32, warmup_epochs=1,
                    decoder_depth=4, workers=0, synthetic_images=400, log_every=5, blr=5e-3, infobatch=0) if demo else dict(
                    arch="vit_base", img_size=224, patch_size=16, epochs=800, batch_size=256, warmup_epochs=10,
                    decoder_depth=8, workers=8, synthetic_images=1000, log_every=20, blr=1.5e-4, infobatch=1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or "synthetic"
    small = args.arch in ("vit_tiny", "vit_small")
    args.decoder_width = args.decoder_width or (256 if small else 512)
    args.decoder_heads = args.decoder_heads or (8 if small else 16)
    if args.amp is None:
        args.amp = "bf16" if torch.cuda.is_available() else "none"
    if args.budget_quantile is None:
        args.budget_quantile = args.mask_ratio
    if args.eval_every is None:
        args.eval_every = max(1, args.epochs // 5)
    if args.out is None:
        args.out = f"runs/selective_mae_{Path(str(args.data)).name}"
    return args


# ---------------------------------------------------------------------------------------- model
def sincos_pos_embed(dim, grid, cls_token=True):
    """Fixed 2-D sin-cos position embedding of MAE: half the channels encode x, half y; [1, 1+grid^2, dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    def encode(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    emb = torch.cat([encode(xs), encode(ys)], dim=1)   # MAE order: w then h
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float()[None]


def attention(q, k, v, key_mask, backend):
    """q [B,H,Nq,D], k/v [B,H,Nk,D], key_mask bool [B,Nk] (True = attend) or None."""
    if backend == "triton":
        from kernels.attention import masked_attention   # lazy: --attn sdpa runs never import triton
        return masked_attention(q, k, v, key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)   # [B, N, D], row-major grid


class Attention(nn.Module):
    def __init__(self, dim, heads, backend):
        super().__init__()
        self.num_heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v, key_mask, self.backend).transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Queries (target positions) attend to the encoder output only (CrossMAE); keys/values are
    projected from the memory's width (official: the encoder's, CrossAttention(encoder_dim, decoder_dim))."""
    def __init__(self, dim, heads, backend, memory_dim):
        super().__init__()
        self.num_heads, self.backend = heads, backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(memory_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, memory, key_mask=None):
        B, Q, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, Q, h, C // h).transpose(1, 2)
        k, v = self.kv(memory).reshape(B, memory.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v, key_mask, self.backend).transpose(1, 2).reshape(B, Q, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """LN -> attention -> LN -> MLP; with memory_dim, cross-attention to the encoder output (CrossMAE)."""
    def __init__(self, dim, heads, backend, memory_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = (Attention(dim, heads, backend) if memory_dim is None
                     else CrossAttention(dim, heads, backend, memory_dim))
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x, key_mask=None, memory=None):
        h = self.norm1(x)
        x = x + (self.attn(h, key_mask) if memory is None else self.attn(h, memory, key_mask))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """MAE-style ViT encoder; module names are timm's, so state_dict keys match timm VisionTransformer."""
    def __init__(self, img_size, patch, dim, depth, heads, backend="sdpa"):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.grid = img_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, self.grid), requires_grad=False)   # fixed
        self.blocks = nn.ModuleList(Block(dim, heads, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def input_tokens(self, images):
        """Patch embedding + position embedding of all N patches: [B, N, D]."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def forward_selected(self, tokens, idx, valid=None):
        """Only the selected tokens (+[CLS]) enter the encoder; valid [B,K] masks padding keys."""
        x = gather_tokens(tokens, idx)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        key_mask = None if valid is None else torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.norm(x), key_mask

    def forward(self, images):
        """All tokens (evaluation): final-norm sequence [B, 1+N, D]."""
        tokens = self.input_tokens(images)
        idx = torch.arange(tokens.shape[1], device=images.device).expand(tokens.shape[0], -1)
        return self.forward_selected(tokens, idx)[0]


def gather_tokens(x, idx):
    """x [B,N,C], idx [B,K] -> [B,K,C]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(images, p):
    """[B,3,H,W] -> [B, N, p*p*3] in MAE's (row, col, channel) pixel order. A permute, not MAE's
    einsum: CUDA autocast runs einsum in bf16, which would round the fp32 loss targets."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)   # nchpwq -> nhwpqc


def unpatchify(x, p, grid):
    B = x.shape[0]
    x = x.reshape(B, grid, grid, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, grid * p, grid * p)              # nhwpqc -> nchpwq


class SelectiveMAE(nn.Module):
    """Encoder over the selected tokens + cross-attention (or self-attention) decoder over R targets."""
    def __init__(self, args):
        super().__init__()
        dim, depth, heads = ARCHS[args.arch]
        depth = args.depth or depth
        self.patch, self.grid = args.patch_size, args.img_size // args.patch_size
        self.num_patches = N = self.grid ** 2
        self.n_keep = math.floor(N * (1 - args.mask_ratio) + 1e-6)           # K
        self.n_targets = math.floor(N * args.recon_ratio + 1e-6)             # R
        assert 1 <= self.n_keep and 1 <= self.n_targets and self.n_keep + self.n_targets <= N, \
            f"K={self.n_keep} + R={self.n_targets} must fit in N={N}"
        self.seed_select, self.psts_rounds = args.seed_select, args.psts_rounds
        self.target_select, self.score_temp = args.target_select, args.score_temp
        self.adaptive, self.budget_quantile = args.adaptive_budget, args.budget_quantile
        self.n_pad = min(max(self.n_keep, round(args.budget_max * self.n_keep)), N - self.n_targets)
        self.norm_pix, self.decoder_kind = bool(args.norm_pix_loss), args.decoder
        self.uses_scores = args.adaptive_budget or args.seed_select != "random" or args.target_select != "random"
        self.encoder = VisionTransformer(args.img_size, self.patch, dim, depth, heads, args.attn)
        dd = args.decoder_width
        if args.decoder == "cross":   # official/CrossMAE: each block's keys/values from the encoder width
            blocks = [Block(dd, args.decoder_heads, args.attn, dim) for _ in range(args.decoder_depth)]
        else:                         # MAE: one Linear(encoder, decoder width), then self-attention
            self.decoder_embed = nn.Linear(dim, dd)
            blocks = [Block(dd, args.decoder_heads, args.attn) for _ in range(args.decoder_depth)]
        self.decoder_blocks = nn.ModuleList(blocks)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dd, self.grid), requires_grad=False)
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch ** 2 * 3)
        self.apply(self._init_weights)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                      # MAE: like a Linear
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def choose_tokens(self, tokens, scores, stage_probs):
        """Visible indices [B,K'] (+ valid mask or None) and target indices [B,R]; no host sync.
        fp32 even under bf16 autocast: bf16 cosines (8-bit mantissa) would tie near/far choices."""
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            if self.adaptive:
                vis_idx, valid = adaptive_budget(scores, self.n_pad, max(1, self.n_keep // 4), self.budget_quantile)
            else:
                vis_idx, valid = psts_select(tokens, scores, self.n_keep, self.psts_rounds, self.seed_select,
                                             self.score_temp, stage_probs), None
            tgt_idx = select_targets(scores, vis_idx, valid, self.n_targets, self.target_select, self.score_temp)
        return vis_idx, tgt_idx, valid

    def decode(self, latent, vis_idx, tgt_idx, key_mask):
        B, R = tgt_idx.shape
        pos = self.decoder_pos_embed.expand(B, -1, -1)
        x = self.mask_token + gather_tokens(pos[:, 1:], tgt_idx)             # queries at the targets
        if self.decoder_kind == "cross":                                     # keys/values from latent [B, 1+K, D]
            for blk in self.decoder_blocks:
                x = blk(x, key_mask, latent)
        else:                                                                # MAE: [visible + targets]
            pos_vis = torch.cat([pos[:, :1], gather_tokens(pos[:, 1:], vis_idx)], dim=1)
            memory = self.decoder_embed(latent) + pos_vis                    # [B, 1+K, dd]
            x = torch.cat([memory, x], dim=1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, R)], dim=1)
            for blk in self.decoder_blocks:
                x = blk(x, key_mask)
            x = x[:, -R:]
        return self.decoder_pred(self.decoder_norm(x))                       # [B, R, p*p*3]

    def forward(self, images, scores, stage_probs):
        tokens = self.encoder.input_tokens(images)
        vis_idx, tgt_idx, valid = self.choose_tokens(tokens.detach(), scores, stage_probs)
        latent, key_mask = self.encoder.forward_selected(tokens, vis_idx, valid)
        pred = self.decode(latent, vis_idx, tgt_idx, key_mask)
        loss = reconstruction_loss(pred, images, tgt_idx, self.patch, self.norm_pix)   # per image [B]
        return loss, pred, vis_idx, tgt_idx, valid


# ------------------------------------------------------------------------------------ selection
def hog_patch_scores(images, patch, needed=True):
    """Per-patch HOG energy [B, N] (spec sec. 4; Triton on CUDA, torch reference on CPU). Zeros when
    not needed (plain-MAE mode: random seeds and targets), so the baseline pays no HOG cost."""
    if not needed:
        return images.new_zeros(images.shape[0], (images.shape[-2] // patch) * (images.shape[-1] // patch))
    from kernels.hog import patch_scores   # lazy: the plain-MAE mode never imports triton
    return patch_scores(images, patch=patch, backend="auto")


def psts_stage(progress):
    """Curriculum of PSTS rounds at training progress p = epoch/epochs (official 800-epoch boundaries
    280/300/580/600 scaled): returns (name, (P(near), P(far), P(random))); blends are linear."""
    if progress < 0.35:
        return "near", (1.0, 0.0, 0.0)
    if progress < 0.375:
        a = (progress - 0.35) / 0.025
        return "blend", (1.0 - a, a, 0.0)
    if progress < 0.725:
        return "far", (0.0, 1.0, 0.0)
    if progress < 0.75:
        a = (progress - 0.725) / 0.025
        return "blend", (0.0, 1.0 - a, a)
    return "random", (0.0, 0.0, 1.0)


def gumbel_keys(scores, temp):
    """Sorting z/T + Gumbel noise and taking the top k = sampling k without replacement from
    softmax(z/T) (Gumbel-top-k); batched, no torch.multinomial. z = the scores standardised per
    image: raw HOG energies (per-image std ~25 on UCM) would make softmax(score/1) nearly one-hot
    (top-k in all but name) and T's meaning depend on the dataset's contrast."""
    s = scores.float()
    z = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
    u = torch.rand_like(s).clamp_(1e-9, 1 - 1e-9)
    return z / temp - torch.log(-torch.log(u))


def round_sizes(total, rounds):
    """Split `total` into `rounds` sizes that differ by at most one (floor first, then ceil)."""
    return [total // rounds + (1 if r >= rounds - total % rounds else 0) for r in range(rounds)]


def psts_select(tokens, scores, n_keep, rounds, seed_select, temp, stage_probs):
    """Progressive semantic token selection (paper sec. 3.2, Alg. 1): [B, n_keep] patch indices.

    Seeds = floor(K/2) (at least 1) top-HOG (or sampled) patches; then `rounds` greedy rounds add the rest. A
    candidate's similarity to the selected set is its max cosine similarity to the selected input
    tokens; per image and round the rule is near (most similar), far (least) or random, drawn with
    the curriculum probabilities stage_probs = (P(near), P(far), P(random)) (a [3] tensor)."""
    B, N, _ = tokens.shape
    if seed_select == "random":                                              # MAE random masking
        return torch.rand(B, N, device=tokens.device).topk(n_keep, dim=1).indices
    n_seed = max(1, n_keep // 2) if rounds > 0 else n_keep   # K = 1: one seed (similarity needs a set)
    key = scores.float() if seed_select == "topk" else gumbel_keys(scores, temp)
    selected = key.topk(n_seed, dim=1).indices
    taken = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, selected, True)
    unit = F.normalize(tokens.float(), dim=-1)
    max_sim = (unit @ gather_tokens(unit, selected).transpose(1, 2)).amax(-1)           # [B, N]
    for size in round_sizes(n_keep - n_seed, rounds) if rounds > 0 else []:    # rounds, not images
        if size == 0:
            continue
        u = torch.rand(B, 1, device=tokens.device)
        near, far = u < stage_probs[0], (u >= stage_probs[0]) & (u < stage_probs[0] + stage_probs[1])
        key = torch.where(near, max_sim, torch.where(far, -max_sim, torch.rand_like(max_sim)))
        picked = key.masked_fill(taken, float("-inf")).topk(size, dim=1).indices
        taken.scatter_(1, picked, True)
        max_sim = torch.maximum(max_sim, (unit @ gather_tokens(unit, picked).transpose(1, 2)).amax(-1))
        selected = torch.cat([selected, picked], dim=1)
    return selected


def adaptive_budget(scores, n_pad, n_min, quantile):
    """Our extension: image i keeps the patches whose HOG energy exceeds the batch-wide `quantile`
    of all patch scores (clamped to [n_min, n_pad]), so busy scenes get more tokens. Returns the
    top-n_pad patches by score [B, n_pad] and valid [B, n_pad] (False = padding, masked keys)."""
    s = scores.float()
    # same count(s > threshold) as torch.quantile's linear rule, which breaks the compiled graph in torch 2.11
    threshold = s.flatten().kthvalue(int(quantile * (s.numel() - 1)) + 1).values
    count = (s > threshold).sum(1).clamp(n_min, n_pad)
    idx = s.topk(n_pad, dim=1).indices
    valid = torch.arange(n_pad, device=s.device)[None] < count[:, None]
    return idx, valid


def select_targets(scores, vis_idx, valid, n_targets, mode, temp):
    """Reconstruction targets (paper sec. 3.2, partial reconstruction): R of the masked patches, the
    highest HOG (topk), sampled from softmax(score/T), or random. Other masked patches are dropped."""
    if mode == "topk":
        key = scores.float()
    elif mode == "sample":
        key = gumbel_keys(scores, temp)
    else:
        key = torch.rand_like(scores, dtype=torch.float32)
    visible = torch.zeros_like(key, dtype=torch.bool).scatter_(
        1, vis_idx, True if valid is None else valid)
    return key.masked_fill(visible, float("-inf")).topk(n_targets, dim=1).indices


# ----------------------------------------------------------------------------------------- loss
def reconstruction_loss(pred, images, tgt_idx, patch, norm_pix=True):
    """Norm-pix MSE per image [B]: mean over pixels, then over the R target patches (the official
    forward_loss_sampling; the caller averages over the batch, InfoBatch with per-image weights)."""
    target = gather_tokens(patchify(images.float(), patch), tgt_idx)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (pred.float() - target).pow(2).mean(-1).mean(-1)


# ------------------------------------------------------------------------------------ schedules
def cosine_schedule(peak, total_steps, warmup_steps, final=0.0):
    """Per-step values: linear warm-up from 0, then cosine to `final`."""
    warm = np.linspace(0, peak, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
    return np.concatenate([warm, final + 0.5 * (peak - final) * (1 + np.cos(np.pi * t))])


def stage_schedule(epochs, steps_per_epoch, device):
    """PSTS curriculum per step as a device tensor [steps, 3] (indexing it never syncs the host)."""
    steps = epochs * steps_per_epoch
    return torch.tensor([psts_stage(s / steps)[1] for s in range(steps)], device=device)


def learning_rate(args, total_batch):
    if args.lr is not None:
        return args.lr
    scale = {"none": 1.0, "rm": args.recon_ratio / args.mask_ratio, "mr": args.mask_ratio / args.recon_ratio}
    return args.blr * total_batch / 256 * scale[args.lr_scale]


def build_optimizer(model, args, lr):
    """AdamW (0.9, 0.95), weight decay on >= 2-D tensors only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


# ---------------------------------------------------------------------------------- distributed
def setup_distributed():
    """torchrun env -> process group (NCCL on GPU, gloo on CPU). Returns (global rank, world, device);
    the device index is the LOCAL rank (one node's GPUs), logging and checkpoints are global rank 0's.
    3 h timeout: the other ranks wait at a barrier while rank 0 evaluates (NCCL's default 10 min
    watchdog would abort them on a large dataset)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True            # fixed shapes: pick the fastest kernels once
        torch.set_float32_matmul_precision("high")       # TF32 fp32 matmuls (cuDNN's TF32 is on by default)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return rank, world, device


def all_mean(t):
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}   # this rank's GPU


def set_rng_state(s):
    """.cpu(): torch and CUDA take CPU ByteTensors only, whatever map_location loaded them."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"].cpu())
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"].cpu())


def forked_rng(device):
    """`with forked_rng(device):` the global RNG (CPU and this device) is restored afterwards."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ------------------------------------------------------------------------------------- InfoBatch
class InfoBatch:
    """InfoBatch (Qin et al., ICLR 2024) as the official main_pretrain.py uses it, InfoBatch(dataset,
    epochs, 0.5, 0.875) (rule of NUS-HPC-AI-Lab/InfoBatch, infobatch.py): every training sample
    keeps its last loss (3 before it is seen, as official: above any norm-pix loss, so not pruned).
    In epochs e < delta * epochs the "well-learned" samples (loss below the mean) are dropped at
    random, int(keep * count) of them kept with weight 1 / keep (keep = 1 - prune_ratio), so the
    expected gradient is unchanged; later epochs use every sample with weight 1.
    It is the loader's index sampler (set_epoch, __iter__, __len__): every rank draws the same
    order from (seed, epoch) and takes its shard as DistributedSampler(drop_last) does; per-sample
    losses are all-gathered every step, so every rank holds the same scores and prunes the same."""
    known_ahead = False   # data.EpochBatchSampler: the order of epoch e exists only once e - 1 is trained

    def __init__(self, n, epochs, prune_ratio, delta, seed, rank, world, device):
        self.keep = min(1.0, max(0.1, 1.0 - prune_ratio))          # official clamp
        self.stop, self.seed, self.rank, self.world = delta * epochs, seed, rank, world
        self.scores, self.weights = torch.full((n,), 3.0, device=device), torch.ones(n, device=device)
        self.order, self.epoch = np.arange(n), None

    def set_epoch(self, epoch):
        if epoch == self.epoch:          # resumed mid-epoch: keep the checkpoint's order and weights
            return
        rng = np.random.default_rng([self.seed, epoch])
        order, self.epoch = np.arange(len(self.scores)), epoch
        self.weights.fill_(1.0)
        if epoch < self.stop:
            scores = self.scores.cpu().numpy()                       # one host sync per epoch
            well = np.flatnonzero(scores < scores.mean())
            kept = rng.choice(well, int(self.keep * len(well)), replace=False)
            self.weights[torch.from_numpy(kept).to(self.weights.device)] = 1.0 / self.keep
            order = np.concatenate([np.flatnonzero(scores >= scores.mean()), kept])
        self.order = rng.permutation(order)

    def shard(self):
        return self.order[self.rank:len(self) * self.world:self.world]

    def __len__(self):
        return len(self.order) // self.world

    def __iter__(self):
        return iter(self.shard().tolist())

    def batch_indices(self, it, batch_size):
        """Dataset positions of this rank's batch `it` (EpochBatchSampler cuts the shard in order)."""
        return torch.from_numpy(np.ascontiguousarray(self.shard()[it * batch_size:(it + 1) * batch_size]))

    def weighted_loss(self, per_sample, indices):
        """Official dataset.update(loss): record the losses of every rank's batch, return the
        batch mean of the losses times their weights."""
        indices = indices.to(per_sample.device)
        both = torch.stack([indices.double(), per_sample.detach().double()])
        if dist.is_initialized():
            parts = [torch.empty_like(both) for _ in range(self.world)]
            dist.all_gather(parts, both)
            both = torch.cat(parts, 1)
        self.scores[both[0].long()] = both[1].float()
        return (per_sample * self.weights[indices]).mean()

    def state_dict(self):
        return {"scores": self.scores.cpu(), "weights": self.weights.cpu(), "order": self.order, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.scores.copy_(state["scores"]), self.weights.copy_(state["weights"])
        self.order, self.epoch = state["order"], state["epoch"]


# ------------------------------------------------------------------------------------ train loop
def split_digest(scenes):
    """Fingerprint of the train/test split (relative paths, labels): a resumed or evaluated run must
    see the split it was trained on, or pretraining images would land in the test split."""
    split = {s: [(scenes.all_samples[i], scenes.all_labels[i]) for i in scenes.splits[s]] for s in ("train", "test")}
    return hashlib.sha1(json.dumps([scenes.name, scenes.classes, split]).encode()).hexdigest()


def check_checkpoint(ckpt, path, args=None, scenes=None):
    """UserError unless `path` was written by this script; with this run's args (--resume), unless
    its model flags, data and split seed are this run's; with scenes, unless the split is its split."""
    script = ckpt.get("script", "an older version or another script")
    if script != SCRIPT:
        raise data.UserError(f"{path} is a checkpoint of {script}, not of this {SCRIPT}: use it with that script")
    saved = ckpt["args"]
    diff = [f"--{k.replace('_', '-')} {saved[k]} (this run: {getattr(args, k)})" for k in ("data", "split_seed",
            *MODEL_KEYS) if args is not None and str(saved[k]).lower() != str(getattr(args, k)).lower()]
    if diff:
        raise data.UserError(f"{path} is a {saved['arch']}/{saved['patch_size']} {saved['img_size']}px checkpoint "
                             f"trained with {', '.join(diff)}: resume with the checkpoint's flags")
    if scenes is not None and ckpt["split"] != split_digest(scenes):
        raise data.UserError(f"the {scenes.name} data found now is not the dataset {path} was trained on (its "
                             f"train/test split differs): point --data-root at that dataset")


def save_checkpoint(writer, path, stateful, args, split, run):
    """Every rank's RNG state is gathered (a collective) so each resumes its own; global rank 0 hands
    the state to the background writer, which makes a host copy before this returns."""
    states = [rng_state()]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        if dist.get_rank() != 0:
            return
    writer.wait()
    previous_ms = writer.write_ms
    writer.save({"script": SCRIPT, **{k: v.state_dict() for k, v in stateful.items()}, "args": vars(args),
                 "split": split, "rng": states, "run": run}, path)
    print(f"checkpoint {path} at epoch {run['epoch']} step {run['step_in_epoch']}: snapshot "
          f"{writer.snapshot_ms:.0f} ms (previous write {previous_ms:.0f} ms, in the background)", flush=True)


def read_log(path):
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


def write_log(path, records, mode="a"):
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def draw_curves(log_path, png_path):
    records = read_log(log_path)
    data.plot_curves(records, png_path, floor=next((r["knn_floor"] for r in records if "knn_floor" in r), None))


def watch_knn(encoder, key, record, args, device, loaders, out):
    """Global rank 0 (the one with loaders) logs record + {key: 20-NN test accuracy of encoder, train
    split as memory} and redraws OUT/curves.png; the others wait. RNG forked, train/eval mode
    restored: exact resume unaffected."""
    if loaders is not None:
        with forked_rng(device):
            training = encoder.training
            f = {s: extract_features(encoder, loaders[s], device, args.eval_feat) for s in ("train", "test")}
            record[key] = knn_classify(*f["train"], *f["test"], len(loaders["train"].dataset.classes))
            encoder.train(training)
        write_log(out / "log.jsonl", [record])
        draw_curves(out / "log.jsonl", out / "curves.png")
        print(f"{key} {record[key]:.2f}%", flush=True)
    if dist.is_initialized():
        dist.barrier()


def train_step(model, core, optimizer, scaler, augment, images, stage_probs, args, weigh=None):
    """One update from a uint8 batch: crops, HOG scores, selection, loss, AdamW step. The model gives
    one loss per image; weigh(losses) reduces them (InfoBatch), else their mean. Returns the loss (a
    device tensor: no host sync) and the host seconds spent on augmentation and HOG calls."""
    start = time.perf_counter()
    views, _ = augment(images)
    scores = hog_patch_scores(views, args.patch_size, core.uses_scores)
    host_s = time.perf_counter() - start
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        losses = model(views, scores, stage_probs)[0]
    loss = weigh(losses) if weigh else losses.mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(core.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), host_s


def train_augment(args):
    return data.BatchAugment(args.img_size, scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rot90=0.5,
                             jitter_p=0.0, gray_p=0.0)   # RRC from the --load-size decode + flips + 90-degree turns


def train(args, rank, world, device):
    """Pretrain; returns (model, finished). Checkpoints (OUT/checkpoint.pth) by wall clock, at the
    end, at --max-steps and on SIGTERM/SIGUSR1; --resume continues exactly, mid-epoch included."""
    out = Path(args.out)
    loader = data.build_loader(args.data, args.data_root, "train", size=args.load_size, batch_size=args.batch_size,
                               shuffle=True, drop_last=True, seed=args.seed, split_seed=args.split_seed,
                               workers=args.workers, cache=args.cache, synthetic_images=args.synthetic_images,
                               skip_bad=args.skip_bad, distributed=world > 1)
    scenes = loader.dataset.scenes
    if rank == 0:
        data.save_splits(scenes, out / "splits.json")
    augment = train_augment(args).to(device)
    model = SelectiveMAE(args).to(device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:   # drop_last with fewer training images per rank than one batch
        raise data.UserError(f"{args.data}: fewer training images per process than --batch-size {args.batch_size} "
                             f"(world {world}); lower --batch-size")
    total_steps = args.epochs * steps_per_epoch     # unpruned: the schedules run on epoch progress
    lr = learning_rate(args, args.batch_size * world)
    lrs = cosine_schedule(lr, total_steps, args.warmup_epochs * steps_per_epoch)
    stages = stage_schedule(args.epochs, steps_per_epoch, device)
    optimizer = build_optimizer(model, args, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    stateful = {"model": model, "optimizer": optimizer, "scaler": scaler}   # each saved and restored by state_dict
    infobatch = None
    if args.infobatch:   # the loader's index sampler: it prunes each epoch's order at set_epoch
        infobatch = InfoBatch(len(loader.rows), args.epochs, args.infobatch_prune, args.infobatch_delta, args.seed,
                              rank, world, device)
        loader.sampler.index_sampler = stateful["infobatch"] = infobatch
    run = {"epoch": 0, "step_in_epoch": 0, "steps_done": 0, "time_s": 0.0, "images_seen": 0, "loss_sum": 0.0}
    ckpt_path = out / "checkpoint.pth"
    resume = ckpt_path if args.resume == "auto" and ckpt_path.exists() else args.resume
    fresh = not resume or resume == "auto"
    if fresh and rank == 0:
        (out / "log.jsonl").unlink(missing_ok=True)   # a new run, a new log
    if not fresh:
        ckpt = data.load_checkpoint(resume)
        check_checkpoint(ckpt, resume, args, scenes)
        for name, obj in stateful.items():
            obj.load_state_dict(ckpt[name])
        run = ckpt["run"]
        if rank < len(ckpt["rng"]):   # a rank the checkpoint did not have keeps its seed + rank streams
            set_rng_state(ckpt["rng"][rank])
        if rank == 0:   # records after the checkpoint are logged again
            kept = [r for r in read_log(out / "log.jsonl") if r.get("step", 0) <= run["steps_done"]]
            write_log(out / "log.jsonl", kept, "w")
            print(f"resumed {resume}: epoch {run['epoch']} step {run['step_in_epoch']}")
    last = args.max_steps or math.inf   # optimizer steps (fewer than total_steps under InfoBatch)
    if rank == 0:
        print(f"SelectiveMAE {args.arch}/{args.patch_size} {args.img_size}px crops of {args.load_size}px: "
              f"N={model.num_patches} K={model.n_keep} R={model.n_targets} decoder={args.decoder} lr={lr:.3g} "
              f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, world {world}, {device}"
              + (f", InfoBatch prune {args.infobatch_prune} until epoch {infobatch.stop:g}" if infobatch else ""))
    core = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:   # grads as views of the buckets: no copy, and no bucket-stride mismatch warning
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True)
    writer, save_points = data.CheckpointWriter(), data.SavePoints(args.save_every, device)
    eval_sets = eval_loaders(args, ("train", "test")) if rank == 0 and args.eval_every else None
    if args.eval_every and fresh:
        watch_knn(random_init_encoder(args, device) if rank == 0 else None, "knn_floor", {}, args, device,
                  eval_sets, out)
    t_start, images_seen, done = time.time() - run["time_s"], run["images_seen"], run["steps_done"]
    for epoch in range(run["epoch"], args.epochs):
        first = run["step_in_epoch"] if epoch == run["epoch"] else 0
        model.train()
        loader.sampler.set_epoch(epoch)
        n_it = len(loader)           # fewer than steps_per_epoch in InfoBatch's pruned epochs
        batches = iter(loader)
        with forked_rng(device):     # loading must not shift the training RNG (exact mid-epoch resume)
            for _ in range(first):   # resumed mid-epoch: the same sampler order, skip what was done
                next(batches)
        loss_sum = torch.zeros((), device=device) + (run["loss_sum"] if first else 0.0)   # the epoch so far
        for it in range(first, n_it):
            with forked_rng(device):
                images, _ = next(batches)
            step = epoch * steps_per_epoch + it * steps_per_epoch // n_it   # lr, PSTS: by epoch progress
            for g in optimizer.param_groups:
                g["lr"] = lrs[step]
            weigh = (lambda losses: infobatch.weighted_loss(losses, infobatch.batch_indices(it, args.batch_size))) \
                if infobatch else None
            loss, _ = train_step(model, core, optimizer, scaler, augment, images.to(device, non_blocking=True),
                                 stages[step], args, weigh)
            loss_sum += loss
            done += 1
            images_seen += images.shape[0] * world
            end_of_epoch = it == n_it - 1
            if done % args.log_every == 0 or end_of_epoch:
                l = all_mean(loss).item()   # the only host sync of the step, when logging
                if not math.isfinite(l):
                    raise data.UserError(f"loss is {l} at step {done}: lower --lr / --blr, or use --amp bf16")
                rate = (images_seen - run["images_seen"]) / (time.time() - t_start - run["time_s"])
                eta = (total_steps - step - 1) * args.batch_size * world / max(rate, 1e-9)
                if rank == 0:
                    print(f"epoch {epoch} step {it + 1}/{n_it} loss {l:.4f} lr {lrs[step]:.3g} "
                          f"psts {psts_stage(step / total_steps)[0]} {rate:.1f} img/s eta {eta / 60:.1f} min",
                          flush=True)
            if end_of_epoch:
                record = {"epoch": epoch, "step": done, "time_s": round(time.time() - t_start, 2), "images_seen":
                          images_seen, "loss": all_mean(loss_sum / n_it).item(), "lr": float(lrs[step])}
                if rank == 0:
                    write_log(out / "log.jsonl", [record])
                if args.eval_every and (epoch + 1) % args.eval_every == 0:
                    watch_knn(core.encoder, "knn", {k: record[k] for k in ("epoch", "step", "time_s", "images_seen")},
                              args, device, eval_sets, out)
            save, stop = save_points.check(done)
            at = (epoch + 1, 0) if end_of_epoch else (epoch, it + 1)
            if save or done == last or (end_of_epoch and epoch == args.epochs - 1):
                save_checkpoint(writer, ckpt_path, stateful, args, split_digest(scenes),
                                {"epoch": at[0], "step_in_epoch": at[1], "steps_done": done,
                                 "progress": (step + 1) / total_steps, "time_s": time.time() - t_start,
                                 "images_seen": images_seen, "loss_sum": all_mean(loss_sum).item()})
            if stop or done == last:
                writer.wait()
                finished = at == (args.epochs, 0)
                if rank == 0 and stop:
                    print(f"preempted ({save_points.signal or 'signal to another rank'}): checkpoint {ckpt_path} at "
                          f"epoch {at[0]} step {at[1]}; resume with the same command plus --resume auto", flush=True)
                elif rank == 0 and not finished:
                    print(f"--max-steps {args.max_steps} reached: checkpoint at epoch {at[0]} step {at[1]}")
                return core, finished and not stop
    writer.wait()
    return core, True


# ------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def extract_features(encoder, loader, device, feat):
    """L2-normalised eval-mode features at --img-size (bf16 autocast on a GPU)."""
    encoder.eval()
    feats, labels = [], []
    for images, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = encoder(data.normalize(images.to(device)))
        f = x[:, 0] if feat == "cls" else torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=1)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_f, train_y, test_f, test_y, n_classes, weight_decay=5e-4, iters=100):
    """Multinomial logistic regression on L2-normalised features, full-batch L-BFGS, fixed
    hyper-parameters (L2 penalty 5e-4 * |W|^2, 100 iterations, strong-Wolfe line search): top-1 %."""
    W = torch.zeros(train_f.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_f @ W + b, train_y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((test_f @ W + b).argmax(1) == test_y).float().mean().item() * 100


def knn_classify(train_f, train_y, test_f, test_y, n_classes, k=20, temp=0.07):
    """Weighted k-NN (DINO): cosine similarity, votes exp(sim/T) of the 20 nearest: top-1 %."""
    correct = 0
    k = min(k, len(train_f))
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes).scatter_add_(1, train_y[idx], (sim / temp).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(test_f)


def eval_loaders(args, splits=("train", "train1", "test"), batch_size=64, workers=None):
    """Evaluation loaders of the run's split, resized to --img-size, not sharded."""
    workers = args.workers if workers is None else workers
    return {s: data.build_loader(args.data, args.data_root, s, size=args.img_size, batch_size=batch_size,
                                 shuffle=False, drop_last=False, seed=args.seed, split_seed=args.split_seed,
                                 workers=workers, cache=args.cache, synthetic_images=args.synthetic_images,
                                 skip_bad=args.skip_bad, distributed=False) for s in splits}


def random_init_encoder(args, device):
    """The encoder as --seed initialises it: the floor of the table and of curves.png (global RNG untouched)."""
    with forked_rng(device):
        torch.manual_seed(args.seed)
        return SelectiveMAE(args).encoder.to(device)


def evaluate(encoder, args, device, loaders, log_path):
    """linear@1%, linear@100%, kNN for the trained encoder and a random-init one (the floor), and the
    time to accuracy of the kNN curve in log_path (OUT/log.jsonl of the run)."""
    n_classes = len(loaders["train"].dataset.classes)
    results = {}
    for name, enc in (("pretrained", encoder), ("random-init", random_init_encoder(args, device))):
        f = {s: extract_features(enc, l, device, args.eval_feat) for s, l in loaders.items()}
        results[name] = {
            "linear@1%": linear_probe(*f["train1"], *f["test"], n_classes),
            "linear@100%": linear_probe(*f["train"], *f["test"], n_classes),
            "knn": knn_classify(*f["train"], *f["test"], n_classes)}
    print(f"\nevaluation on {args.data} ({len(loaders['train'].rows)} train / {len(loaders['test'].rows)} "
          f"test, {n_classes} classes), top-1 %")
    print(f"{'protocol':<14}{'pretrained':>12}{'random-init':>13}")
    for proto in ("linear@1%", "linear@100%", "knn"):
        print(f"{proto:<14}{results['pretrained'][proto]:>12.2f}{results['random-init'][proto]:>13.2f}")
    reached = data.time_to_accuracy(read_log(log_path))
    if reached is not None:
        print(f"time to accuracy: {reached:.0f} s (kNN within 1 point of its final value)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "eval.json", "w") as fh:
        json.dump(results, fh, indent=1)
    return results


# ------------------------------------------------------------------------------------ visualize
@torch.no_grad()
def visualize(model, args, device, progress, n=8):
    """PNG grid, one row per image: input | visible patches (dimmed = masked, red = targets) |
    input with the reconstructed targets pasted in (norm-pix predictions de-normalised per patch)."""
    from PIL import Image
    loader = eval_loaders(args, ("test",), batch_size=n, workers=0)["test"]
    images = data.normalize(next(iter(loader))[0].to(device))
    model.eval()
    probs = torch.tensor(psts_stage(progress)[1], device=device)
    _, pred, vis_idx, tgt_idx, valid = model(images, hog_patch_scores(images, args.patch_size), probs)
    p, grid = args.patch_size, model.grid
    patches = patchify(images, p)
    target = gather_tokens(patches, tgt_idx)
    if model.norm_pix:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    B, N = patches.shape[:2]
    visible = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, vis_idx, True if valid is None else valid)
    is_target = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, tgt_idx, True)
    mean = torch.tensor(data.IMAGENET_MEAN, device=device).repeat(p * p)
    std = torch.tensor(data.IMAGENET_STD, device=device).repeat(p * p)
    pix = patches * std + mean                                             # [B,N,p*p*3] in [0,1]
    red = torch.tensor([1.0, 0.0, 0.0], device=device).repeat(p * p)
    masks = torch.where(visible[..., None], pix, torch.where(is_target[..., None], 0.5 * pix + 0.5 * red, 0.3 * pix))
    recon = pix.scatter(1, tgt_idx[..., None].expand_as(pred), (pred * std + mean).float())
    recon = torch.where(visible[..., None] | is_target[..., None], recon, 0.3 * pix)
    cols = [unpatchify(t, p, grid) for t in (pix, masks, recon)]
    rows = torch.cat([torch.cat(cols, dim=3)[i] for i in range(B)], dim=1)   # [3, B*H, 3*W]
    arr = (rows.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    scale = max(1, 128 // args.img_size)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    path = Path(args.out) / "visualize.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"wrote {path} (columns: input | visible, red = targets | reconstruction)")
    return path


# ---------------------------------------------------------------------------------------- bench
def flops_per_image(model, args):
    """Model FLOPs of one training step per image (forward x 3, but x 2 for the patch embedding:
    no image gradient), matmuls only. Matches torch.utils.flop_counter.FlopCounterMode exactly once
    the attention matmuls (which it does not count for CPU SDPA) are added; PSTS cosines excluded."""
    D, depth = ARCHS[args.arch][0], args.depth or ARCHS[args.arch][1]
    d, L = args.decoder_width, args.decoder_depth
    N, R = model.num_patches, model.n_targets
    T = 1 + (model.n_pad if model.adaptive else model.n_keep)
    embed = 2 * N * D * 3 * args.patch_size ** 2
    enc = embed + depth * (24 * T * D * D + 4 * T * T * D)
    if args.decoder == "cross":   # keys/values projected from the encoder width D in every block
        dec = L * (2 * R * d * d + 4 * T * D * d + 4 * R * T * d + 2 * R * d * d + 16 * R * d * d)
    else:
        S = T + R
        dec = 2 * T * D * d + L * (24 * S * d * d + 4 * S * S * d)
    return 3 * (enc + dec + 2 * R * d * 3 * args.patch_size ** 2) - embed


def bench(args, device):
    """N timed steps on random uint8 images at --load-size: augmentation to the crops, HOG scores,
    selection, forward/backward/step. Also the host time per step outside the model (augmentation
    and HOG calls issued from the host; the loader is not part of this benchmark)."""
    model = SelectiveMAE(args).to(device)
    optimizer = build_optimizer(model, args, 1e-4)
    step_model = torch.compile(model) if args.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    augment = train_augment(args).to(device)
    images = torch.randint(0, 256, (args.batch_size, 3, args.load_size, args.load_size), dtype=torch.uint8,
                           device=device)
    probs = torch.tensor(psts_stage(0.0)[1], device=device)
    host_s = []

    def step():
        host_s.append(train_step(step_model, model, optimizer, scaler, augment, images, probs, args)[1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5 if args.compile else 2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    host_s.clear()
    t0 = time.perf_counter()
    for _ in range(args.bench):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.bench
    ips = args.batch_size / dt
    line = (f"bench {args.arch}/{args.patch_size} {args.img_size}px crops of {args.load_size}px bs {args.batch_size} "
            f"K={model.n_keep} R={model.n_targets} decoder={args.decoder} seeds={args.seed_select} "
            f"targets={args.target_select}{' adaptive' if args.adaptive_budget else ''} amp={args.amp} "
            f"attn={args.attn} compile={args.compile}: {ips:.1f} images/s, {dt * 1e3:.1f} ms/step, host outside "
            f"the model {1e3 * sum(host_s) / len(host_s):.1f} ms/step (augment + HOG)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense bf16
        peak = next((v for k, v in peaks.items() if k in name), None)
        mfu = f"{100 * flops_per_image(model, args) * ips / peak:.1f}%" if peak else "n/a"
        line += (f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, MFU {mfu} ({name}; TF32 "
                 f"matmul/cuDNN and cudnn.benchmark on)")
    else:
        line += ", peak mem / MFU: n/a on CPU"
    print(line)
    return ips


# ----------------------------------------------------------------------------------------- main
def checkpoint_modes(args, ckpt, path, device):
    """--export, --visualize, --eval-only (any together) on the checkpoint `path`; output in OUT."""
    out = Path(args.out)
    model = SelectiveMAE(args).to(device)
    model.load_state_dict(ckpt["model"])
    out.mkdir(parents=True, exist_ok=True)
    if args.export:
        torch.save(model.encoder.state_dict(), out / "backbone.pth")
        print(f"wrote {out / 'backbone.pth'}: {len(model.encoder.state_dict())} tensors with timm ViT names")
    if args.visualize or args.eval_only:
        loaders = eval_loaders(args)
        check_checkpoint(ckpt, path, scenes=loaders["test"].dataset.scenes)
        data.save_splits(loaders["test"].dataset.scenes, out / "splits.json")
    if args.visualize:
        visualize(model, args, device, ckpt["run"]["progress"])
    if args.eval_only:
        log_path = Path(path).parent / "log.jsonl"
        if log_path.exists():
            draw_curves(log_path, out / "curves.png")
            print(f"wrote {out / 'curves.png'} from {log_path}")
        evaluate(model.encoder, args, device, loaders, log_path)


def main(argv=None):
    args, explicit = parse_args(argv)
    ckpt_path = args.eval_only or args.export or args.visualize
    ckpt = data.load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:
        check_checkpoint(ckpt, ckpt_path)
    demo = args.data is None and ckpt is None
    args = resolve_args(args, ckpt["args"] if ckpt else None, explicit)
    rank, world, device = setup_distributed()
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if ckpt is not None:
        if rank == 0:
            checkpoint_modes(args, ckpt, ckpt_path, device)
        return
    args.load_size = data.resolve_load_size(args.data, args.data_root, args.img_size, args.load_size,
                                            args.synthetic_images)   # native size, at most 2x --img-size
    if args.bench:
        return bench(args, device)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "args.json", "w") as f:
            json.dump(vars(args), f, indent=1)
    t0 = time.time()
    model, finished = train(args, rank, world, device)
    if rank == 0:
        print(f"training took {time.time() - t0:.1f} s")
    if finished and not args.no_eval and rank == 0:
        evaluate(model.encoder, args, device, eval_loaders(args), out / "log.jsonl")
    if finished and demo and rank == 0:
        visualize(model, args, device, 1.0)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    data.run_main(main)
