"""Fused HOG patch scoring: one Triton kernel from images to per-patch HOG energy (SPEC section 4).

SelectiveMAE ranks patches by how much structure they hold; MaskFeat regresses per-cell HOG
histograms. Both need the same thing: per-channel Sobel gradients, an unsigned 9-bin orientation
histogram per 8x8 cell (magnitude-weighted, hard assignment), then either the energy of each
patch or the L2-normalised cell histograms. This file holds

- `hog_reference(images, cell=8)`: plain torch, the definition line by line (Sobel, atan2,
  scatter_add), returning the unnormalised cell histograms [B, 3, 9, H/cell, W/cell];
- `_hog_kernel`: one Triton program per (image, patch). It loads the patch's pixels and their
  one-pixel halo (reflect padding at the image borders) straight from the input, computes the
  Sobel pair, magnitude and bin in registers, reduces to cell histograms, and writes the patch
  score (and optionally the normalised features). No full-resolution intermediate touches HBM;
  the halo loads are neighbours of the same tile and are served by L1/L2;
- `patch_scores(images, patch=16, backend="auto") -> [B, N]` and
  `hog_features(images, cell=8, backend="auto") -> [B, 27, H/cell, W/cell]`, the public API;
- `python -m kernels.hog`: the benchmark (B=256, 3x224x224, float32 and uint8; Triton vs the
  reference eager and torch.compile'd).

Conventions (the MaskFeat / SlowFast `HOGLayerC` ones, not scikit-image's):
- Sobel pair wx = [[1,0,-1],[2,0,-2],[1,0,-1]], wy = wx^T applied as conv2d (cross-correlation),
  so gx = left column - right column, gy = top row - bottom row; reflect padding of 1. Both paths
  evaluate it as (weighted sum of one side) - (the other side), in the same order, so their
  gradients are bit-identical and exactly 0 on flat regions.
- magnitude = sqrt(gx^2 + gy^2); bin = floor(atan2(gx, gy) / pi * 9) mod 9 (unsigned, 20 degrees).
- uint8 input is read as raw 0..255 values; gradients are computed in those units (exact integers
  in float32) and the magnitude is multiplied by 1/255. That equals converting the image to [0, 1]
  first (up to float rounding), but keeps every gradient exact, so the bins of uint8 images are
  identical on both paths.
  float32 / bfloat16 / float16 input is used as is (normalised or not: the op is shift invariant).
- Bin ties. The kernel has no atan2 (`triton.language` lacks it; libdevice does not run under
  TRITON_INTERPRET=1). It folds (gx, gy) into the half-plane of the unsigned orientation (negate
  both when gx < 0, or gx == 0 and gy < 0), then counts the interior bin edges k*20 deg, k=1..8,
  that the vector lies AT OR BEYOND: cos(k*20) * gx >= sin(k*20) * gy (a cross-product sign test,
  written as a comparison of two products so no FMA contraction can change it). A vector with
  gx == 0 (orientation 0 or 180 deg, including the zero vector) is bin 0, as floor(atan2) gives.
  "At or beyond" is floor's convention. No non-zero float vector lies exactly on an interior edge
  (tan(20k deg) is irrational), so exact ties only occur at 0/180 deg, where both paths agree.
  Every integer gradient vector with |gx|, |gy| <= 1020 (all uint8 images) gets the same bin from
  both paths (checked exhaustively). The reference takes atan2 in float64 (float32 atan2 / pi * 9
  misbins vectors within a few microdegrees of an edge: 3 of the 29M pixel-channels of the
  full-size test images, seeds 9-11). For float input the kernel's float32 products can still
  differ from it for a vector within ~1e-8 rad of an edge: none of those 29M did.
- Features: h / max(||h||_2, eps) per cell and channel, eps = 1e-12 (F.normalize's default, as in
  MaskFeat); all-zero cells stay zero. Channel-major layout: feature index = channel * 9 + bin.
"""
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

try:  # triton is optional for the torch path (CPU-only installs without it still work)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

NBINS = 9
CELL = 8
FEATURE_EPS = 1e-12
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
# The interior bin edges k*20 deg, k = 1..8, as (cos, sin) in the atan2(gx, gy) frame. The kernel
# spells the same numbers as literals (tl cannot read a Python list); a test checks they match.
BIN_EDGES = [(math.cos(k * math.pi / NBINS), math.sin(k * math.pi / NBINS))
             for k in range(1, NBINS)]


# ----------------------------------------------------------------------------------------------
# Torch reference: SPEC section 4 line by line.
# ----------------------------------------------------------------------------------------------
def _as_float_image(images):
    """float32 image and the factor that brings its gradient magnitudes to image units.

    uint8 stays in raw 0..255 units (exact integer gradients) and gets magnitude scale 1/255."""
    if images.dtype == torch.uint8:
        return images.float(), 1.0 / 255.0
    return images.float(), 1.0


def sobel_gradients(images):
    """(gx, gy) float32 [B, 3, H, W] in input units: Sobel pair per channel, reflect padding 1.

    gx = conv2d(x, [[1,0,-1],[2,0,-2],[1,0,-1]]), gy = conv2d(x, its transpose), spelled out as
    (left column sum) - (right column sum) and (top row sum) - (bottom row sum). Same numbers as
    F.conv2d (a test checks it), but exact on flat regions: conv2d's summation order (or Winograd)
    leaves ~1e-7 residues there, so a constant image would not score exactly 0."""
    x, _ = _as_float_image(images)
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    at = lambda dy, dx: xp[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731  x[i+dy, j+dx]
    gx = (at(-1, -1) + 2.0 * at(0, -1) + at(1, -1)) - (at(-1, 1) + 2.0 * at(0, 1) + at(1, 1))
    gy = (at(-1, -1) + 2.0 * at(-1, 0) + at(-1, 1)) - (at(1, -1) + 2.0 * at(1, 0) + at(1, 1))
    return gx, gy


def orientation_bins(gx, gy):
    """Unsigned orientation bin in 0..8: floor(atan2(gx, gy) / pi * 9) mod 9 (MaskFeat).

    Evaluated in float64: float32 atan2(..) / pi * 9 is off by ~1e-7 bins, which puts a vector
    within a few microdegrees of an edge in the wrong bin (1 pixel-channel in each of the 9.6M-sample
    full-size test batches, e.g. one at 140.000003 deg); the float64 angle bins the float32
    gradients as exact arithmetic does."""
    phase = torch.atan2(gx.double(), gy.double()) / math.pi * NBINS   # in [-9, 9]
    return phase.floor().long() % NBINS                 # torch's % is Python's: -1 % 9 == 8


def hog_reference(images, cell=CELL):
    """Unnormalised HOG cell histograms [B, 3, 9, H/cell, W/cell] float32 (plain torch).

    images: [B, 3, H, W] float32 / bfloat16 / float16 / uint8 (see the module docstring for the
    uint8 scale), H and W divisible by `cell`."""
    _check_images(images, cell, cell, "cell")
    _, scale = _as_float_image(images)
    gx, gy = sobel_gradients(images)
    magnitude = torch.sqrt(gx * gx + gy * gy) * scale
    bins = orientation_bins(gx, gy)
    b, c, h, w = gx.shape
    hist = torch.zeros(b, c, NBINS, h, w, device=gx.device)
    hist.scatter_add_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))   # hard assignment
    # Sum each cell x cell block: [B, C, 9, H/cell, cell, W/cell, cell] -> sum the cell axes.
    hist = hist.view(b, c, NBINS, h // cell, cell, w // cell, cell).sum(dim=(4, 6))
    return hist


def scores_from_histograms(hist, patch, cell=CELL):
    """[B, N] HOG energy: mean over the patch's cells and channels of each cell's histogram norm."""
    b = hist.shape[0]
    norms = hist.norm(dim=2)                                   # [B, C, H/cell, W/cell]
    k = patch // cell
    per_patch = F.avg_pool2d(norms, kernel_size=k, stride=k)   # mean over the patch's cells
    return per_patch.mean(dim=1).reshape(b, per_patch.shape[-2] * per_patch.shape[-1])  # row-major


def features_from_histograms(hist, eps=FEATURE_EPS):
    """[B, C*9, H/cell, W/cell]: per-cell, per-channel L2-normalised histograms (MaskFeat)."""
    b, c, nb, hc, wc = hist.shape
    return F.normalize(hist, p=2, dim=2, eps=eps).reshape(b, c * nb, hc, wc)


# ----------------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _orientation_bin(gx, gy):
        """Bin 0..8 of floor(atan2(gx, gy) / pi * 9) mod 9 without atan2 (see module docstring)."""
        # Fold into the half-plane of the unsigned orientation: angle in [0, 180) degrees.
        flip = (gx < 0) | ((gx == 0) & (gy < 0))
        u = tl.where(flip, -gx, gx)        # sin component (>= 0 after the fold)
        v = tl.where(flip, -gy, gy)        # cos component
        # One sign test per interior edge k*20 deg: at or beyond <=> cos_k * u >= sin_k * v.
        b = (0.9396926207859084 * u >= 0.3420201433256687 * v).to(tl.int32)
        b += (0.7660444431189780 * u >= 0.6427876096865393 * v).to(tl.int32)
        b += (0.5000000000000001 * u >= 0.8660254037844386 * v).to(tl.int32)
        b += (0.17364817766693041 * u >= 0.984807753012208 * v).to(tl.int32)
        b += (-0.1736481776669303 * u >= 0.984807753012208 * v).to(tl.int32)
        b += (-0.4999999999999998 * u >= 0.8660254037844387 * v).to(tl.int32)
        b += (-0.7660444431189779 * u >= 0.6427876096865395 * v).to(tl.int32)
        b += (-0.9396926207859083 * u >= 0.3420201433256689 * v).to(tl.int32)
        # u == 0: orientation exactly 0 (or the zero vector, atan2(0, 0) = 0) -> bin 0.
        return tl.where(u > 0, b, 0)

    @triton.jit
    def _orientation_bin_kernel(gx_ptr, gy_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """Test helper: the kernel's binning applied to given gradient vectors."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        gx = tl.load(gx_ptr + offs, mask=m, other=0.0)
        gy = tl.load(gy_ptr + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, _orientation_bin(gx, gy), mask=m)

    @triton.jit
    def _hog_kernel(x_ptr, scores_ptr, feats_ptr,
                    H, W, stride_b, stride_c, stride_h, stride_w,
                    patches_w, n_patches, cells_h, cells_w,
                    mag_scale, eps,
                    CELL: tl.constexpr,           # cell side in pixels (power of two)
                    PATCH_CELLS: tl.constexpr,    # patch side in cells
                    NC_BLOCK: tl.constexpr,       # next power of two >= PATCH_CELLS**2
                    WRITE_SCORES: tl.constexpr, WRITE_FEATURES: tl.constexpr):
        # One program = one (image, patch). The patch's pixels are held as a [cells, pixels of
        # a cell] tile, so every cell's histogram is a row reduction.
        pid = tl.program_id(0)
        b = pid // n_patches
        p = pid % n_patches
        cell = tl.arange(0, NC_BLOCK)
        pix = tl.arange(0, CELL * CELL)
        n_cells: tl.constexpr = PATCH_CELLS * PATCH_CELLS
        cell_ok = cell < n_cells
        cy = (p // patches_w) * PATCH_CELLS + cell // PATCH_CELLS   # cell row in the image
        cx = (p % patches_w) * PATCH_CELLS + cell % PATCH_CELLS     # cell column in the image
        y = cy[:, None] * CELL + (pix // CELL)[None, :]             # [NC_BLOCK, CELL*CELL]
        x = cx[:, None] * CELL + (pix % CELL)[None, :]
        mask = cell_ok[:, None] & (pix[None, :] >= 0)
        # Neighbour rows / columns with reflect padding of 1 (row -1 -> 1, row H -> H-2).
        y_up = tl.where(y == 0, 1, y - 1)
        y_dn = tl.where(y == H - 1, H - 2, y + 1)
        x_lf = tl.where(x == 0, 1, x - 1)
        x_rt = tl.where(x == W - 1, W - 2, x + 1)
        r_up = y_up * stride_h
        r_mid = y * stride_h
        r_dn = y_dn * stride_h
        c_lf = x_lf * stride_w
        # The centre column goes through a clamp as well (a no-op: x < W). Left bare, the compiler
        # knows it is contiguous and vectorises its two loads, while the six reflected loads are
        # scalar: two layouts, so 12 conversions through shared memory (104 barriers) per program.
        c_mid = tl.minimum(x, W - 1) * stride_w
        c_rt = x_rt * stride_w
        image = x_ptr + b.to(tl.int64) * stride_b

        energy = tl.zeros([NC_BLOCK], dtype=tl.float32)
        bins16 = tl.arange(0, 16)                                   # 9 bins padded to 16
        for ch in tl.static_range(3):
            base = image + ch * stride_c
            # The 8 neighbours of each pixel (the centre has Sobel weight 0).
            a = tl.load(base + r_up + c_lf, mask=mask, other=0).to(tl.float32)
            t = tl.load(base + r_up + c_mid, mask=mask, other=0).to(tl.float32)
            c = tl.load(base + r_up + c_rt, mask=mask, other=0).to(tl.float32)
            l = tl.load(base + r_mid + c_lf, mask=mask, other=0).to(tl.float32)
            r = tl.load(base + r_mid + c_rt, mask=mask, other=0).to(tl.float32)
            d = tl.load(base + r_dn + c_lf, mask=mask, other=0).to(tl.float32)
            s = tl.load(base + r_dn + c_mid, mask=mask, other=0).to(tl.float32)
            e = tl.load(base + r_dn + c_rt, mask=mask, other=0).to(tl.float32)
            gx = (a + 2.0 * l + d) - (c + 2.0 * r + e)              # left column - right column
            gy = (a + 2.0 * t + c) - (d + 2.0 * s + e)              # top row - bottom row
            magnitude = tl.sqrt(gx * gx + gy * gy) * mag_scale
            magnitude = tl.where(mask, magnitude, 0.0)
            bin_ = _orientation_bin(gx, gy)
            # Cell histograms: one masked row sum per bin.
            norm2 = tl.zeros([NC_BLOCK], dtype=tl.float32)
            hist = tl.zeros([NC_BLOCK, 16], dtype=tl.float32)
            for k in tl.static_range(9):
                h_k = tl.sum(tl.where(bin_ == k, magnitude, 0.0), axis=1)   # [NC_BLOCK]
                norm2 += h_k * h_k
                if WRITE_FEATURES:
                    hist += tl.where(bins16[None, :] == k, h_k[:, None], 0.0)
            norm = tl.sqrt(norm2)
            energy += norm
            if WRITE_FEATURES:
                inv = 1.0 / tl.maximum(norm, eps)
                row = (b.to(tl.int64) * 3 + ch) * 9 + bins16[None, :]     # feature plane index
                offs = (row * cells_h + cy[:, None]) * cells_w + cx[:, None]
                fmask = cell_ok[:, None] & (bins16[None, :] < 9)
                tl.store(feats_ptr + offs, hist * inv[:, None], mask=fmask)
        if WRITE_SCORES:
            energy = tl.where(cell_ok, energy, 0.0)
            score = tl.sum(energy, axis=0) / (3.0 * n_cells)
            tl.store(scores_ptr + pid, score)


# ----------------------------------------------------------------------------------------------
# Validation and host launcher.
# ----------------------------------------------------------------------------------------------
def _check_images(images, size, cell, what):
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W] (rank 4), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (NCHW RGB), got shape {tuple(images.shape)}")
    if images.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"images dtype {images.dtype} is not supported; use float32, bfloat16, "
                        f"float16 or uint8")
    if not isinstance(size, int) or not isinstance(cell, int) or cell < 1 or size < cell:
        raise ValueError(f"{what}={size} and cell={cell} must be positive integers, {what} >= cell")
    if size % cell:
        raise ValueError(f"{what}={size} must be a multiple of the HOG cell size {cell}")
    h, w = images.shape[-2:]
    if h % size or w % size:
        raise ValueError(f"image size {h}x{w} is not divisible by the {what} size {size}")


def _resolve_backend(images, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if images.is_cuda and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not images.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set "
                               "before triton is imported (or use backend='torch')")
    return backend


def _launch(images, patch, cell, write_scores, write_features):
    """Run `_hog_kernel` over every (image, patch); returns (scores [B, N], features or None)."""
    if cell & (cell - 1):
        raise ValueError(f"the Triton path needs a power-of-two cell size, got {cell}")
    b, _, h, w = images.shape
    patch_cells = patch // cell
    patches_h, patches_w = h // patch, w // patch
    n_patches = patches_h * patches_w
    cells_h, cells_w = h // cell, w // cell
    dev = images.device
    scores = torch.empty(b, n_patches, device=dev, dtype=torch.float32)
    feats = (torch.empty(b, 3 * NBINS, cells_h, cells_w, device=dev, dtype=torch.float32)
             if write_features else scores)  # dummy pointer when features are not written
    if b == 0:
        return scores, (feats if write_features else None)
    nc_block = triton.next_power_of_2(patch_cells * patch_cells)
    elems = nc_block * cell * cell
    # Warps, from the sm_90 compile (`python -m kernels.hog --sass`): one warp per 4-cell tile keeps
    # every row reduction inside the warp (no shared memory, no barrier) and issues the fewest warp
    # instructions; 16-cell tiles take 2 warps (1 warp spills, 4 and 8 issue more instructions).
    num_warps = max(1, min(8, elems // 512))
    mag_scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    sb, sc, sh, sw = images.stride()   # strided reads: non-contiguous input is never copied
    # On the tensor's own GPU, whichever device is current (a caller need not call set_device).
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _hog_kernel[(b * n_patches,)](
            images, scores, feats, h, w, sb, sc, sh, sw,
            patches_w, n_patches, cells_h, cells_w, mag_scale, FEATURE_EPS,
            CELL=cell, PATCH_CELLS=patch_cells, NC_BLOCK=nc_block,
            WRITE_SCORES=write_scores, WRITE_FEATURES=write_features, num_warps=num_warps)
    return scores, (feats if write_features else None)


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------
def patch_scores(images, patch=16, backend="auto"):
    """Per-patch HOG energy, float32 [B, (H/patch)*(W/patch)] in row-major grid order.

    Score = mean over the patch's 8x8 cells and the 3 channels of the L2 norm of the cell's
    unnormalised 9-bin histogram: flat background ~0, edges and small objects high.
    backend: "triton", "torch" (the reference) or "auto" (Triton on CUDA, torch on CPU)."""
    _check_images(images, patch, CELL, "patch")
    backend = _resolve_backend(images, backend)
    if backend == "torch":
        return scores_from_histograms(hog_reference(images, CELL), patch, CELL)
    return _launch(images, patch, CELL, True, False)[0]


def hog_features(images, cell=CELL, backend="auto"):
    """MaskFeat HOG targets: float32 [B, 27, H/cell, W/cell], each cell's 9-bin histogram per
    channel L2-normalised (h / max(||h||, 1e-12); all-zero cells stay 0).
    Feature index = channel * 9 + bin."""
    _check_images(images, cell, cell, "cell")
    backend = _resolve_backend(images, backend)
    if backend == "torch":
        return features_from_histograms(hog_reference(images, cell))
    # Group cells into the largest square tile (4x4, 2x2 or 1 cell) that tiles the image, so
    # each program has enough pixels to keep its warps busy.
    h, w = images.shape[-2:]
    group = next(g for g in (4, 2, 1) if (h // cell) % g == 0 and (w // cell) % g == 0)
    return _launch(images, cell * group, cell, False, True)[1]


# ----------------------------------------------------------------------------------------------
# Benchmark: python -m kernels.hog
# ----------------------------------------------------------------------------------------------
def _bench_gpu(batch=256, size=224, patch=16):
    from datetime import datetime, timezone
    import triton.testing
    dev = torch.device("cuda")
    print(f"HOG patch scores, B={batch}, 3x{size}x{size}, patch {patch} | "
          f"{torch.cuda.get_device_name(dev)} | torch {torch.__version__} | triton "
          f"{triton.__version__} | {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    reference = lambda x: scores_from_histograms(hog_reference(x, CELL), patch, CELL)  # noqa: E731
    compiled = torch.compile(reference)
    print(f"{'dtype':8} {'impl':18} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'GB/s':>8} "
          f"{'ms / Triton ms':>14}", flush=True)
    for dtype in (torch.float32, torch.uint8):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.rand(batch, 3, size, size, device=dev, generator=g)
        x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x
        nbytes = x.numel() * x.element_size() + batch * (size // patch) ** 2 * 4
        name = str(dtype).replace("torch.", "")
        t_triton = None
        # Triton first, torch.compile last: a cold inductor compile can take most of a short time
        # limit (.ci/gpu gives this step 45 s), and every row is printed as soon as it is measured.
        for impl, fn in (("triton", lambda: patch_scores(x, patch, backend="triton")),
                         ("torch eager", lambda: reference(x)),
                         ("torch.compile", lambda: compiled(x))):
            fn()                   # compile / warm up outside the timed region
            ms, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            t_triton = ms if t_triton is None else t_triton
            print(f"{name:8} {impl:18} {ms:10.3f} {p20:8.3f} {p80:8.3f} {nbytes / ms / 1e6:8.0f} "
                  f"{ms / t_triton:14.2f}", flush=True)
            if impl == "triton":
                out, ref = fn(), reference(x)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                print(f"{'':8} max |triton - reference| / max |reference| = {err:.2e}", flush=True)


def _bench_cpu(batch=8, size=224, patch=16):
    import time
    from datetime import datetime, timezone
    torch.manual_seed(0)
    print("No CUDA device: the Triton benchmark needs a GPU (B=256, 3x224x224). "
          f"CPU timing of the torch reference instead, B={batch}, 3x{size}x{size}, patch {patch}, "
          f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC:")
    for dtype in (torch.float32, torch.uint8):
        x = torch.rand(batch, 3, size, size)
        x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x
        patch_scores(x, patch, backend="torch")   # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            patch_scores(x, patch, backend="torch")
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"  {str(dtype).replace('torch.', ''):8} reference eager: median {times[2]:.1f} ms "
              f"(min {times[0]:.1f}, max {times[-1]:.1f}) = {batch / times[2] * 1e3:.0f} images/s")


SASS_VARIANTS = [  # (dtype, patch, features): what the scripts launch on 224 x 224 images
    (torch.float32, 16, False),   # SelectiveMAE's patch ranking
    (torch.uint8, 16, False),
    (torch.float32, 32, True),    # hog_features: 4 x 4-cell tiles of 8-px cells
]


def sass_report():
    """Markdown table of the sm_90 compile of each kernel variant (no GPU needed): resources and
    SASS instruction counts per program (the kernel has no loop: one program = one pass)."""
    from kernels import capture_launches, compile_like_jit, sass_stats
    print("| variant | warps | regs | shared B | spill B | layout conversions | shared st / ld | barriers | "
          "instr / thread | warp instr / program | warp instr / cell |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype, patch, features in SASS_VARIANTS:
        x = torch.empty(2, 3, 224, 224, dtype=dtype)
        with capture_launches(sys.modules[__name__], ["_hog_kernel"]) as launches:
            _launch(x, patch, CELL, not features, features)
        (fn, args, kwargs), = launches
        st = sass_stats(compile_like_jit(fn, args, kwargs))
        k, cells = st["kernel"], (patch // CELL) ** 2
        name = f"{str(dtype).replace('torch.', '')} patch {patch} {'features' if features else 'scores'}"
        print(f"| {name} | {st['warps']} | {st['regs']} | {st['shared']} | {st['local']} | "
              f"{st['convert_layout']} | {k['shared_st']} / {k['shared_ld']} | {k['bar']} | {k['instrs']} | "
              f"{k['instrs'] * st['warps']} | {k['instrs'] * st['warps'] / cells:.0f} |", flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Benchmark HOG patch scores (Triton vs torch).")
    parser.add_argument("--batch", type=int, default=None, help="images (default 256 GPU, 8 CPU)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--sass", action="store_true",
                        help="no benchmark: compile each kernel variant for sm_90 as the JIT would and "
                             "print registers, shared memory and SASS instruction counts (no GPU needed)")
    args = parser.parse_args()
    if args.sass:
        sass_report()
        sys.exit(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and triton is not None:
        _bench_gpu(args.batch or 256, args.size, args.patch)
    else:
        _bench_cpu(args.batch or 8, args.size, args.patch)
