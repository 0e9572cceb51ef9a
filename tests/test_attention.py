"""kernels/attention.py: Triton masked attention and the torch paths vs the reference.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) with 16 x 16
blocks, so the small shapes here still cover several query and key blocks and ragged tails. On a
CUDA machine the same tests run the compiled kernels on the GPU (DEVICE), plus GPU_CASES at the
shapes of the scripts (too slow for the interpreter).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.attention import attention_reference, masked_attention

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _make(B, H, n_q, n_k, D, dtype, mask_kind, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, n_k, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, n_k, D, generator=g).to(device, dtype).requires_grad_()
    if mask_kind is None:
        return q, k, v, None
    mask = torch.rand(B, n_k, generator=g) < 0.6
    mask[:, 0] = True
    if mask_kind == "hard":
        mask[1] = False                        # a sample with every key masked
        if B > 2:
            mask[2] = False
            mask[2, n_k // 2] = True           # a sample with a single valid key
    elif mask_kind == "padded":
        mask[0, n_k // 3:] = False             # variable-length set: padding after the last key
        mask[1] = False
        mask[1, -1] = True                     # single valid key, the last: leading blocks all masked
    return q, k, v, mask.to(device)


def _check_against_reference(q, k, v, mask, backend, scale=None):
    dtype = q.dtype
    out = masked_attention(q, k, v, mask, scale=scale, backend=backend)
    ref = attention_reference(q, k, v, mask, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(x).all(), f"{backend} {name} has NaN/inf"
        err = _rel_err(x, r)
        assert err < TOL[dtype], f"{backend} {name} {dtype}: relative error {err:.2e} >= {TOL[dtype]}"
    if mask is not None:
        dq, dk, dv = grads
        masked_keys = ~mask[:, None, :, None].expand_as(dk)
        # Masked keys and values get exactly zero gradient.
        assert (dk[masked_keys] == 0).all() and (dv[masked_keys] == 0).all()
        # Samples without any valid key return exactly 0 and pass zero gradient to their queries.
        empty = ~mask.any(dim=1)
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    return out


CASES = [  # (B, H, Nq, Nk, D, dtype, mask kind)
    (3, 2, 13, 7, 32, torch.float32, "hard"),
    (2, 1, 33, 70, 64, torch.float32, "padded"),
    (3, 2, 13, 7, 32, torch.bfloat16, "hard"),
    (2, 1, 33, 40, 64, torch.bfloat16, "padded"),
    (3, 1, 21, 18, 32, torch.float16, "hard"),
    (1, 2, 17, 17, 32, torch.float32, None),
    (1, 1, 5, 9, 128, torch.float32, "random"),
    # Past the launched tiles (the interpreter runs the GPU configs): 2 query blocks x 4 key blocks
    # forward; backward 2 key programs adding into the same dQ rows, 3 query tiles, ragged tails.
    (3, 1, 150, 200, 32, torch.float32, "hard"),
    (2, 2, 130, 140, 64, torch.bfloat16, "padded"),
]


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,mask_kind", CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference(B, H, n_q, n_k, D, dtype, mask_kind, backend):
    q, k, v, mask = _make(B, H, n_q, n_k, D, dtype, mask_kind)
    _check_against_reference(q, k, v, mask, backend)


GPU_CASES = [  # the scripts' shapes: ViT-B 197 tokens, SelectiveMAE's 29 kept + padding, its decoder
    (8, 12, 197, 197, 64, torch.bfloat16, "padded"),
    (8, 12, 197, 197, 64, torch.float16, "hard"),
    (16, 6, 40, 40, 64, torch.bfloat16, "padded"),
    (8, 12, 49, 30, 64, torch.bfloat16, "hard"),
    (4, 16, 257, 257, 64, torch.float32, "random"),
    (4, 4, 300, 130, 128, torch.bfloat16, "padded"),
    (4, 6, 197, 197, 32, torch.bfloat16, None),
]


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels at full size need a GPU")
@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,mask_kind", GPU_CASES)
def test_matches_reference_on_gpu_at_script_shapes(B, H, n_q, n_k, D, dtype, mask_kind):
    q, k, v, mask = _make(B, H, n_q, n_k, D, dtype, mask_kind)
    _check_against_reference(q, k, v, mask, "triton")


def test_custom_ops_pass_opcheck():
    """The forward / backward ops' fake (meta) implementations, schemas and autograd registration
    agree with the real kernels (what torch.compile relies on), with and without a key mask."""
    from kernels.attention import _attention_fwd_op
    for mask_kind in ("padded", None):
        q, k, v, mask = _make(2, 1, 21, 18, 32, torch.float32, mask_kind)
        qv = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided input too
        for args in ((q, k, v, mask, 0.2), (qv, k, v, mask, 0.2)):
            torch.library.opcheck(_attention_fwd_op, args)


def test_compiles_to_one_graph_with_the_kernel():
    """torch.compile(fullgraph=True) over the Triton path: no graph break, and the same output and
    gradients as eager."""
    q, k, v, mask = _make(2, 2, 13, 20, 32, torch.float32, "padded")

    def f(q, k, v, mask):
        return (masked_attention(q, k, v, mask, backend="triton") * 1.5).sin()
    eager = f(q, k, v, mask)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    g = torch.randn(eager.shape, device=eager.device)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), g), torch.autograd.grad(compiled, (q, k, v), g)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_custom_scale_and_strided_views():
    """Views of a fused qkv projection (non-contiguous, unit last stride) and an explicit scale."""
    B, N, H, D = 2, 19, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE).permute(2, 0, 3, 1, 4)   # 3 x [B, H, N, D] views
    q, k, v = (t.requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    mask = (torch.rand(B, N, generator=g) < 0.5).to(DEVICE)
    mask[:, 0] = True
    out = _check_against_reference(q, k, v, mask, "triton", scale=0.3)
    assert torch.allclose(out, masked_attention(q, k, v, mask, scale=0.3, backend="torch"), atol=1e-5)


def test_mask_semantics_against_dense_softmax():
    """Reference = softmax over the valid keys only (checked against slicing them out by hand)."""
    q, k, v, mask = _make(2, 1, 4, 9, 32, torch.float32, "random")
    out = masked_attention(q, k, v, mask, backend="triton")
    for b in range(2):
        keep = mask[b]
        expected = torch.softmax(q[b] @ k[b][:, keep].transpose(-2, -1) / 32 ** 0.5, -1) @ v[b][:, keep]
        assert torch.allclose(out[b], expected, atol=1e-5)


def test_auto_backend_on_cpu_is_torch_path():
    q, k, v, mask = _make(3, 2, 6, 5, 16, torch.float32, "hard", device="cpu")   # D=16: the torch path takes any D
    out = masked_attention(q, k, v, mask)
    assert torch.allclose(out, attention_reference(q, k, v, mask), atol=1e-6)
    assert (out[1] == 0).all()


def test_gradcheck_float64_reference_and_sdpa():
    q, k, v, mask = _make(3, 1, 2, 3, 2, torch.float64, "hard", device="cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: masked_attention(a, b, c, mask, backend="torch"), (q, k, v))


def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 2, 5, 32)
    k = torch.randn(2, 2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    for backend in ("triton", "torch"):
        _err(lambda: masked_attention(q[0], k, k, backend=backend), ValueError, "rank 4")
        _err(lambda: masked_attention(q, k, k[:, :, :6], backend=backend), ValueError, "same shape")
        _err(lambda: masked_attention(q, k[:1], k[:1], backend=backend), ValueError, "agree on B, H and D")
        _err(lambda: masked_attention(q, k, k, mask.float(), backend=backend), TypeError, "bool")
        _err(lambda: masked_attention(q, k, k, mask[:, :5], backend=backend), ValueError, r"\[B, Nk\]")
        _err(lambda: masked_attention(q, k.half(), k.half(), backend=backend), TypeError, "same dtype")
    _err(lambda: masked_attention(q[..., :24], k[..., :24], k[..., :24], backend="triton"), ValueError, "head dims")
    _err(lambda: masked_attention(q.double(), k.double(), k.double(), backend="triton"), TypeError, "fp16")
    _err(lambda: masked_attention(q, k, k, backend="cuda"), ValueError, "backend")
    _err(lambda: attention_reference(q, k, k, mask.int()), TypeError, "bool")
    _err(lambda: masked_attention(q, k.to("meta"), k.to("meta")), ValueError, "same device")


def test_sass_report_compiles_what_runs():
    """`python -m kernels.attention --sass`: the kernels of every script shape go through triton's
    whole pipeline to sm_90 with the JIT's specialisation of the real launch arguments. The
    backward is one kernel with FlashAttention-2's 5 matrix products per tile pair and dQ by
    atomic adds; no kernel spills; the streamed loads are pipelined (async copies in the loop)."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"ptxas not shipped with this triton ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.attention", "--sass"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in proc.stdout.splitlines() if r.startswith("| _attn")]
    kernels = {r[0] for r in rows}
    assert kernels == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd"}, kernels
    for name, shape, tile, warps, regs, shared, spill, dots, loop, mma, copies, atomics, per_k in rows:
        assert int(spill) == 0 and 0 < int(regs) <= 255 and int(shared) <= 232448, (name, shape)
        if name != "_attn_bwd_preprocess":
            assert int(dots) == (5 if name == "_attn_bwd" else 2), (name, shape, dots)
            assert int(mma) > 0 and int(copies) > 0, (name, shape, mma, copies)
            assert (int(atomics) > 0) == (name == "_attn_bwd"), (name, shape, atomics)
