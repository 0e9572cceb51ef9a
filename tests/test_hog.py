"""kernels/hog.py: Triton vs the torch reference, properties, a hand-computed case, input validation,
and an sm_90 compile check (SPEC section 4). Without a GPU the kernel runs under TRITON_INTERPRET=1
(conftest.py); on a CUDA machine the same tests run the compiled kernel on the GPU (DEVICE)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import hog
from kernels.hog import hog_features, hog_reference, patch_scores

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread is faster, and on a loaded 2-core box much faster
    (two OpenMP threads spin against other jobs: ~3 ms -> ~140 ms per reference call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("shape,dtype,patch", [
    ((2, 3, 32, 32), torch.float32, 16),
    ((1, 3, 48, 64), torch.float32, 16),
    ((1, 3, 16, 24), torch.float32, 8),
    ((1, 3, 64, 32), torch.float32, 32),
    ((1, 3, 16, 32), torch.bfloat16, 16),
    ((1, 3, 32, 48), torch.uint8, 16),
    ((1, 3, 16, 16), torch.uint8, 8),
    ((1, 3, 16, 16), torch.float16, 16),
    ((1, 3, 48, 24), torch.float32, 24),   # 9 cells per patch: a masked, padded cell block
])
def test_scores_match_reference(shape, dtype, patch):
    x = _images(shape, dtype)
    got = patch_scores(x, patch, backend="triton")
    ref = patch_scores(x, patch, backend="torch")
    n = (shape[2] // patch) * (shape[3] // patch)
    assert got.shape == ref.shape == (shape[0], n) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (ref > 0).all()                     # random images: every patch has structure
    assert _rel_err(got, ref) < 1e-4
    # The score is the documented reduction of the reference histograms.
    hist = hog_reference(x)
    manual = hist.norm(dim=2).unfold(2, patch // 8, patch // 8).unfold(3, patch // 8, patch // 8)
    manual = manual.mean(dim=(1, 4, 5)).reshape(shape[0], -1)
    torch.testing.assert_close(ref, manual, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size batches need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_scores_match_reference_on_gpu_at_script_shapes(dtype):
    x = _images((64, 3, 224, 224), dtype, seed=9)
    for patch in (8, 16, 32):
        got, ref = patch_scores(x, patch, backend="triton"), patch_scores(x, patch, backend="torch")
        assert got.shape == ref.shape == (64, (224 // patch) ** 2)
        assert _rel_err(got, ref) < 1e-4, (patch, _rel_err(got, ref))
    got, ref = hog_features(x, backend="triton"), hog_features(x, backend="torch")
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape,dtype,cell", [((1, 3, 32, 32), torch.float32, 8),
                                              ((1, 3, 24, 16), torch.uint8, 8),  # 1-cell programs
                                              ((1, 3, 16, 16), torch.bfloat16, 8),
                                              ((1, 3, 16, 16), torch.float32, 4),
                                              ((1, 3, 32, 32), torch.float32, 16)])
def test_features_match_reference(shape, dtype, cell):
    x = _images(shape, dtype, seed=1)
    got = hog_features(x, cell, backend="triton")
    ref = hog_features(x, cell, backend="torch")
    assert got.shape == ref.shape == (shape[0], 27, shape[2] // cell, shape[3] // cell)
    assert (got - ref).abs().max().item() < 1e-5


def test_reference_sobel_equals_conv2d():
    x = _images((2, 3, 16, 24), torch.float32, seed=4).cpu()
    wx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    gx = torch.nn.functional.conv2d(xp, wx.expand(3, 1, 3, 3), groups=3)
    gy = torch.nn.functional.conv2d(xp, wx.t().expand(3, 1, 3, 3), groups=3)
    sx, sy = hog.sobel_gradients(x)
    torch.testing.assert_close(sx, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sy, gy, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_reference():
    x = _images((1, 3, 16, 32), torch.float32).cpu()
    assert torch.equal(patch_scores(x), patch_scores(x, backend="torch"))
    assert torch.equal(hog_features(x), hog_features(x, backend="torch"))


# ---------------------------------------------------------------- binning without atan2
def _kernel_bins(gx, gy):
    """The kernel's orientation bins of (gx, gy), computed on DEVICE, returned on the CPU."""
    gx, gy = gx.to(DEVICE), gy.to(DEVICE)
    n = gx.numel()
    out = torch.empty(n, dtype=torch.int32, device=DEVICE)
    block = min(1 << 20, 1 << max(4, (n - 1).bit_length()))    # Triton's limit is 2**20 elements
    grid = ((n + block - 1) // block,)
    hog._orientation_bin_kernel[grid](gx.contiguous(), gy.contiguous(), out, n, BLOCK=block)
    return out.long().cpu()


def test_kernel_bins_equal_atan2_on_all_uint8_gradients():
    # Every Sobel gradient of a uint8 image is an integer vector with |gx|, |gy| <= 4 * 255.
    r = torch.arange(-1020, 1021, dtype=torch.float32)
    gx, gy = torch.meshgrid(r, r, indexing="ij")
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    assert torch.equal(_kernel_bins(gx, gy), hog.orientation_bins(gx, gy))


def test_kernel_bins_at_named_directions_and_random_floats():
    # (gx, gy) -> atan2(gx, gy) in degrees -> bin = floor(deg / 20) mod 9 (unsigned).
    cases = [((0.0, 0.0), 0),      # zero vector: atan2(0, 0) = 0 -> bin 0
             ((0.0, 1.0), 0),      # 0 deg
             ((0.0, -1.0), 0),     # 180 deg -> 9 -> mod 9 = 0 (exact tie at the fold)
             ((-0.0, -1.0), 0),    # -180 deg -> -9 -> 0
             ((1.0, 0.0), 4),      # 90 deg -> 4.5
             ((-1.0, 0.0), 4),     # -90 deg -> -4.5 -> floor -5 -> 4
             ((1.0, 1.0), 2),      # 45 deg -> 2.25
             ((1.0, -1.0), 6),     # 135 deg -> 6.75
             ((-1.0, -1.0), 2),    # -135 deg -> -6.75 -> -7 -> 2
             ((-1.0, 1.0), 6),     # -45 deg -> -2.25 -> -3 -> 6
             ((1e-30, -1.0), 8)]   # just below 180 deg: last bin
    gx = torch.tensor([c[0][0] for c in cases])
    gy = torch.tensor([c[0][1] for c in cases])
    want = torch.tensor([c[1] for c in cases])
    assert torch.equal(_kernel_bins(gx, gy), want)
    assert torch.equal(hog.orientation_bins(gx[:-1], gy[:-1]), want[:-1])
    g = torch.randn(2, 100_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_kernel_bins(g[0], g[1]), hog.orientation_bins(g[0], g[1]))


def test_vectors_microdegrees_from_an_edge_get_the_exact_bin():
    # The three gradient vectors of the full-size GPU test's images (randn seeds 9, 10, 11) that lie
    # within 3e-6 degrees of a bin edge: float32 atan2 / pi * 9 put each in the neighbouring bin.
    # The exact bin, from atan2 in float64: 140.000003 deg -> 7, -80.0000007 -> 4, 119.999997 -> 5.
    gx = torch.tensor([float.fromhex(h) for h in ("0x1.518724p+1", "-0x1.998f44p-1", "0x1.cfdc3ap+1")])
    gy = torch.tensor([float.fromhex(h) for h in ("-0x1.924008p+1", "0x1.20dd9ap-3", "-0x1.0bcf5p+1")])
    exact = torch.tensor([7, 4, 5])
    degrees = [math.degrees(math.atan2(a, b)) for a, b in zip(gx.tolist(), gy.tolist())]
    assert [math.floor(d / 20) % 9 for d in degrees] == exact.tolist()
    float32_bins = (torch.atan2(gx, gy) / math.pi * 9).floor().long() % 9
    assert (float32_bins != exact).all()       # what the reference computed before
    assert torch.equal(hog.orientation_bins(gx, gy), exact)
    assert torch.equal(_kernel_bins(gx, gy), exact)


def test_kernel_edge_literals_are_the_bin_edges():
    src = Path(hog.__file__).read_text()       # the kernel's literals, read from the source
    pairs = re.findall(r"\((-?[0-9.]+) \* u >= ([0-9.]+) \* v\)", src)
    assert len(pairs) == 8
    for (c, s), (cos_k, sin_k) in zip(pairs, hog.BIN_EDGES):
        assert float(c) == pytest.approx(cos_k, abs=1e-15)
        assert float(s) == pytest.approx(sin_k, abs=1e-15)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_constant_image_scores_zero(backend):
    for x in (torch.full((1, 3, 16, 32), 0.7), torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)):
        b, w = x.shape[0], x.shape[3]
        x = x.to(DEVICE)
        assert torch.equal(patch_scores(x, 16, backend=backend).cpu(), torch.zeros(b, w // 16))
        assert torch.equal(hog_features(x, backend=backend).cpu(), torch.zeros(b, 27, 2, w // 8))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_edge_and_small_object_score_above_every_flat_patch(backend):
    # 2 x 4 grid of 16-px patches: faint noise everywhere, a step edge inside patch 1 and a 3x3
    # bright square inside patch 6, both away from patch borders (the Sobel halo is 1 px).
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.01 * torch.randn(1, 3, 32, 64, generator=g)
    x[:, :, 2:14, 16 + 8:16 + 14] += 0.5               # patch (0, 1): vertical edge at column 24
    x[:, :, 16 + 6:16 + 9, 32 + 6:32 + 9] += 1.0       # patch (1, 2): small bright object
    s = patch_scores(x.to(DEVICE), 16, backend=backend)[0].cpu()
    flat = torch.ones(8, dtype=torch.bool)
    flat[[1, 6]] = False
    assert s[1] > 5 * s[flat].max() and s[6] > 5 * s[flat].max()


def test_scores_invariant_to_adding_a_constant():
    # Dyadic values (k / 256) stay exact after +0.25, so the gradients, and the scores, are equal.
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(0, 256, (1, 3, 16, 32), generator=g).float() / 256).to(DEVICE)
    for backend in ("triton", "torch"):
        shifted = patch_scores(x + 0.25, 16, backend=backend)
        assert torch.equal(shifted, patch_scores(x, 16, backend=backend))
    u8 = torch.randint(0, 200, (1, 3, 16, 32), generator=g, dtype=torch.uint8).to(DEVICE)
    shifted = patch_scores(u8 + 55, 16, backend="triton")
    assert torch.equal(shifted, patch_scores(u8, 16, backend="triton"))
    # Generic floats: rounding of x + c perturbs gradients by ~1e-6, so allow a small tolerance.
    y = torch.randn(1, 3, 16, 16, generator=g).to(DEVICE)
    shifted = patch_scores(y + 3.0, 16, backend="triton")
    assert _rel_err(shifted, patch_scores(y, 16, backend="torch")) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_hand_computed_16x16(dtype):
    # Channel R: vertical step 0 -> 1 between columns 7 and 8. For an image constant along rows,
    #   gx[j] = (1 + 2 + 1) * (x[j-1] - x[j+1]) = 4 * (x[j-1] - x[j+1]): -4 at j = 7 and j = 8, 0
    #   elsewhere (reflect padding: x[-1] = x[1], x[16] = x[14], so the borders give 0); gy = 0.
    #   atan2(-4, 0) = -90 deg -> -4.5 -> floor -5 -> mod 9 = bin 4, magnitude 4.
    #   Each 8x8 cell holds one such column: 8 pixels x 4 = 32 in bin 4.
    # Channel G: horizontal step 0 -> 0.5 between rows 7 and 8: gy = 4 * (0 - 0.5) = -2 at rows 7,
    #   8; gx = 0; atan2(0, -2) = 180 deg -> 9 -> mod 9 = bin 0. Each cell: 8 x 2 = 16 in bin 0.
    # Channel B: constant 0 -> nothing.
    # Cell norms per channel: 32, 16, 0 -> score = mean over cells and channels = 48 / 3 = 16
    # for every patch, whatever the patch size (all four cells are alike).
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, :, 8:] = 1.0
    x[0, 1, 8:, :] = 0.5
    if dtype == torch.uint8:   # uint8 is read as value / 255: same picture, same numbers
        x = (x * 254).to(torch.uint8)
        scale = 254 / 255
    else:
        scale = 1.0
    x = x.to(DEVICE)
    for backend in ("triton", "torch"):
        for patch, n in ((16, 1), (8, 4)):
            s = patch_scores(x, patch, backend=backend).cpu()
            torch.testing.assert_close(s, torch.full((1, n), 16.0 * scale), rtol=1e-6, atol=1e-6)
        f = hog_features(x, backend=backend).cpu()
        want = torch.zeros(1, 27, 2, 2)
        want[0, 0 * 9 + 4] = 1.0          # R: bin 4
        want[0, 1 * 9 + 0] = 1.0          # G: bin 0
        torch.testing.assert_close(f, want, rtol=1e-6, atol=1e-6)
    hist = hog_reference(x).cpu()
    assert hist.shape == (1, 3, 9, 2, 2)
    torch.testing.assert_close(hist[0, 0, 4], torch.full((2, 2), 32.0 * scale))
    torch.testing.assert_close(hist[0, 1, 0], torch.full((2, 2), 16.0 * scale))
    assert hist.sum().item() == pytest.approx(4 * 48.0 * scale)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_features_are_unit_norm_per_cell_where_nonzero(backend):
    x = _images((1, 3, 32, 32), torch.float32, seed=7)
    x[:, :, :16, :16] = 0.0                 # a flat corner: its inner cells have no gradient
    f = hog_features(x, backend=backend).view(1, 3, 9, 4, 4)
    norms = f.norm(dim=2)
    zero = hog_reference(x).norm(dim=2) == 0
    assert zero.sum() >= 3 and (norms[zero] == 0).all()
    torch.testing.assert_close(norms[~zero], torch.ones_like(norms[~zero]), rtol=1e-5, atol=1e-5)
    assert (f >= 0).all()


# ---------------------------------------------------------------- input handling
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_and_empty_batch(backend):
    x = _images((2, 3, 16, 32), torch.float32, seed=2)
    want = patch_scores(x, 16, backend="torch")
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)        # same values, W stride 16
    xc = x.contiguous(memory_format=torch.channels_last)
    xs = torch.stack([x, -x], dim=1)[:, 0]                         # batch stride doubled
    for v in (xt, xc, xs):
        assert not v.is_contiguous()
        assert _rel_err(patch_scores(v, 16, backend=backend), want) < 1e-4
    empty = torch.empty(0, 3, 32, 48, device=DEVICE)
    assert patch_scores(empty, 16, backend=backend).shape == (0, 6)
    assert hog_features(empty, backend=backend).shape == (0, 27, 4, 6)
    assert hog_features(empty.to(torch.uint8), backend=backend).dtype == torch.float32


@pytest.mark.parametrize("bad,kwargs,err,match", [
    (torch.zeros(3, 32, 32), {}, ValueError, "rank 4"),
    (torch.zeros(1, 1, 32, 32), {}, ValueError, "3 channels"),
    (torch.zeros(1, 4, 32, 32), {}, ValueError, "3 channels"),
    (torch.zeros(1, 3, 32, 40), {}, ValueError, "not divisible by the patch size 16"),
    (torch.zeros(1, 3, 48, 48), {"patch": 32}, ValueError, "not divisible"),
    (torch.zeros(1, 3, 36, 36), {"patch": 12}, ValueError, "multiple of the HOG cell size 8"),
    (torch.zeros(1, 3, 32, 32), {"patch": 0}, ValueError, "positive"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.float64), {}, TypeError, "float64"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int32), {}, TypeError, "not supported"),
    (torch.zeros(1, 3, 32, 32), {"backend": "cuda"}, ValueError, "backend must be"),
    ([[0.0]], {}, TypeError, "torch.Tensor"),
])
def test_bad_input_errors(bad, kwargs, err, match):
    with pytest.raises(err, match=match):
        patch_scores(bad, **kwargs)


def test_bad_input_errors_features_and_reference():
    with pytest.raises(ValueError, match="not divisible by the cell size 8"):
        hog_features(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match="3 channels"):
        hog_reference(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="power-of-two cell"):
        hog_features(torch.zeros(1, 3, 24, 24, device=DEVICE), cell=6, backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        patch_scores(torch.zeros(1, 3, 16, 16), backend="triton")


# ---------------------------------------------------------------- compiles for Hopper
_EXTRA_SM90 = r"""
import sys, torch
import kernels.hog as hog
from kernels import capture_launches, compile_like_jit, sass_stats
x = torch.empty(1, 3, 48, 48, dtype=torch.bfloat16)   # 9 cells per patch: a masked, padded cell block
with capture_launches(hog, ["_hog_kernel"]) as launches:
    hog._launch(x, 24, 8, True, False)
st = sass_stats(compile_like_jit(*launches[0]))
print("bf16 patch 24", st["warps"], st["local"], st["convert_layout"])
"""


def _without_interpreter(code_or_args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(r"ptxas|nvdisasm|cuobjdump|No such file|CUDA_HOME", out):
        pytest.skip(f"cannot compile for sm_90 on this machine (environment): {out[-300:]}")
    assert proc.returncode == 0, out[-3000:]
    return proc.stdout


def test_sass_report_compiles_what_runs_without_layout_conversions():
    """`python -m kernels.hog --sass`: every launched variant compiles for sm_90 with the JIT's
    specialisation, with no layout conversion (no shared-memory round trips between load layouts), no
    spills, and the one-warp patch-16 programs with no shared memory and no barrier at all."""
    rows = [r for r in _without_interpreter(["-m", "kernels.hog", "--sass"]).splitlines() if r.startswith("| ")]
    table = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[1:]}
    assert set(table) == {"float32 patch 16 scores", "uint8 patch 16 scores", "float32 patch 32 features"}
    for name, (warps, regs, shared, spill, conversions, st_ld, barriers, *_) in table.items():
        assert int(spill) == 0 and int(conversions) == 0, (name, table[name])
        assert 0 < int(regs) <= 255
        if name.endswith("16 scores"):
            assert (warps, shared, st_ld, barriers) == ("1", "0", "0 / 0", "0"), (name, table[name])
    extra = _without_interpreter(_EXTRA_SM90)
    assert "bf16 patch 24 2 0 0" in extra, extra


def test_cpu_benchmark_runs_without_cuda(capsys):
    # `python -m kernels.hog` without CUDA: a clear message and a CPU timing of the reference.
    hog._bench_cpu(batch=2, size=32, patch=16)
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "float32" in out and "uint8" in out and "images/s" in out
