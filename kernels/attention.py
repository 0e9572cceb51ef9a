"""Masked attention: FlashAttention-2 style forward and backward Triton kernels with a per-sample key mask.

    out = masked_attention(q, k, v, key_mask=None, scale=None, backend="auto")

q [B, H, Nq, D], k and v [B, H, Nk, D], key_mask bool [B, Nk] (True = attend; one mask per sample,
shared by all heads and all queries). Any Nq and Nk (Nq != Nk for cross-attention, lengths that
are not multiples of the block sizes); D in {32, 64, 128}; fp16 / bf16 (fp32 for tests).

Semantics (SPEC section 5):
- softmax(q k^T * scale) v over the keys that the mask lets through; scale defaults to D**-0.5;
- a sample whose keys are ALL masked has every query row returning exactly 0 (never NaN), and
  those rows pass zero gradient to q, k and v;
- masked keys and values receive exactly zero gradient (their probability is exactly 0, in the
  forward and in the backward).

Backends: "triton" (the kernels below; on CPU tensors only under TRITON_INTERPRET=1), "torch"
(F.scaled_dot_product_attention with the boolean mask, all-masked samples fixed up) and "auto"
(triton on CUDA, torch on CPU). `attention_reference` is the same op in plain torch float32 math.

Algorithm (Dao 2023, FlashAttention-2; the Triton fused-attention tutorial):
- forward: one program per (query block, batch*head). It streams the key blocks, keeping a running
  row max m, a running row sum l and an fp32 output accumulator (online softmax, base 2: scores are
  pre-multiplied by log2(e) so exp2 replaces exp). It writes out = acc / l and the row
  log-sum-exp LSE = m + log2(l) (base 2, -inf for a row with no valid key) for the backward.
- backward: delta = rowsum(dO * O) (preprocess kernel, which also zeroes an fp32 dQ accumulator);
  then one kernel, one program per key block, looping over ALL query blocks: it recomputes
  P = exp2(S - LSE) and does FlashAttention-2's 5 matrix products per tile pair, dK and dV in
  registers, dQ added into the accumulator with fp32 atomics (as FA2's Triton version), cast to
  the input dtype at the end. The atomics make dQ's summation order vary from run to run on a GPU
  (fp32 rounding only). (The tutorial's backward is written for causal attention with lengths
  divisible by the blocks and recomputes S and dP in a separate dQ kernel; here every loop masks its
  tails and loads the key mask per block.)
- keys past the last valid key of a sample (padding of variable-length token sets) are skipped:
  the host computes key_end[b] = 1 + index of the last True key once per forward (the backward
  reuses it), and the loops stop there.

Benchmark (needs CUDA): `python -m kernels.attention` (forward+backward against SDPA's flash,
cuDNN and efficient backends and FlexAttention, at the rsmim scripts' shapes). Offline record (no
GPU): `python -m kernels.attention --sass` (registers, shared memory, spills and SASS counts per
loop iteration of every launched kernel, compiled for sm_90 as the JIT specialises it).
"""

import contextlib
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

HEAD_DIMS = (32, 64, 128)
BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _interpreting():
    """True when triton.jit built interpreter functions (TRITON_INTERPRET=1 before triton's import)."""
    return _INTERPRETED


# ------------------------------------------------------------------------------------------------
# Triton kernels
#
# Every loop over blocks is written twice around one @triton.jit step function: a `for ... in range(...)`
# (compiled: the form Triton software-pipelines) and a `while` loop, used under TRITON_INTERPRET=1
# only, because triton 3.6's interpreter cannot take a runtime tensor as a `range` bound with
# numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars").
# ------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PRECISION "upcast" (bf16 under the interpreter only):
    triton 3.6's interpreter multiplies bf16 tiles as raw integers, so multiply them as fp32."""
    if DOT_PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _program_ids(N, BLOCK: tl.constexpr):
    """(block index, batch * head) of this program in the 1-D grid of cdiv(N, BLOCK) * B * H.

    The block index varies fastest, so the programs of one (batch, head) run side by side and
    share its K/V tiles in L2; a 1-D grid also avoids CUDA's 65535 limit on grid dims 2 and 3."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _block_and_head(N, BLOCK: tl.constexpr, H):
    """(block index, batch * head, batch, head) of this program; batch and head as int64 offsets."""
    start, off_bh = _program_ids(N, BLOCK)
    return start, off_bh, (off_bh // H).to(tl.int64), (off_bh % H).to(tl.int64)


@triton.jit
def _row_tile(Ptr, b, h, rows, offs_d, stride_b, stride_h, stride_n, stride_d, N):
    """The [rows, D] tile of sample b, head h of a [B, H, N, D] tensor (zeros past N)."""
    return tl.load(Ptr + b * stride_b + h * stride_h + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=(rows < N)[:, None], other=0.0)


@triton.jit
def _key_end(KeyEnd, b, N_K, HAS_MASK: tl.constexpr):
    """1 + the sample's last valid key: key blocks from there on are all masked and are skipped."""
    key_end = N_K
    if HAS_MASK:
        key_end = tl.load(KeyEnd + b)
    return key_end


@triton.jit
def _key_block(K, V, KeyMask, b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
               cols, offs_d, N_K, HAS_MASK: tl.constexpr):
    """K and V tiles [BLOCK_N, D] (zeros past N_K) and which of these keys may be attended."""
    key_in = cols < N_K
    key_ok = key_in
    if HAS_MASK:
        key_ok = key_in & (tl.load(KeyMask + b * stride_mb + cols, mask=key_in, other=0) != 0)
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_in[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_in[:, None], other=0.0)
    return k, v, key_ok


@triton.jit
def _fwd_step(q, K, V, KeyMask, b, start_n, m_i, l_i, acc, scale_log2,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, N_K,
              HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: update the running max m, sum l and accumulator."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k, v, key_ok = _key_block(K, V, KeyMask, b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                              cols, tl.arange(0, HEAD_DIM), N_K, HAS_MASK)
    # Scores in base-2 units; masked keys get -inf, so their p is exactly 0.
    s = _dot(q, tl.trans(k), DOT_PRECISION)
    s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no valid key yet has m = -inf: subtract 0 instead (-inf - -inf = NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)                       # rescales the old sums to the new max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd(Q, K, V, KeyMask, KeyEnd, Out, LSE,
              scale_log2,  # softmax scale * log2(e)
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, H, N_Q, N_K,
              HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # Program (query block, batch * head): out = softmax(q k^T) v over the valid keys, and the LSE.
    start_m, off_bh, b, h = _block_and_head(N_Q, BLOCK_M, H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < N_Q
    q = _row_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd, N_Q)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_end = _key_end(KeyEnd, b, N_K, HAS_MASK)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)        # running sum of p v
    if INTERPRET:
        start_n = 0
        while start_n < key_end:
            m_i, l_i, acc = _fwd_step(q, K, V, KeyMask, b, start_n, m_i, l_i, acc, scale_log2,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, N_K,
                                      HAS_MASK, HEAD_DIM, BLOCK_N, DOT_PRECISION)
            start_n += BLOCK_N
    else:
        for start_n in range(0, key_end, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, K, V, KeyMask, b, start_n, m_i, l_i, acc, scale_log2,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, N_K,
                                      HAS_MASK, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    # Rows without any valid key have l = 0 and acc = 0: they return 0 and store LSE = -inf.
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_in[:, None])
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_in)


@triton.jit
def _attn_bwd_preprocess(Out, DOut, Delta, DQAcc,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_db, stride_dh, stride_dm, stride_dd,
                         H, N_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij): the softmax-backward correction term. Also
    # zeroes these rows of the fp32 dQ accumulator, which the backward kernel adds into (this saves
    # a memset launch).
    start_m, off_bh, b, h = _block_and_head(N_Q, BLOCK_M, H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < N_Q
    o = _row_tile(Out, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_om, stride_od, N_Q).to(tl.float32)
    do = _row_tile(DOut, b, h, offs_m, offs_d, stride_db, stride_dh, stride_dm, stride_dd, N_Q).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=row_in)
    rows = off_bh.to(tl.int64) * N_Q + offs_m
    tl.store(DQAcc + rows[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK_M, HEAD_DIM], tl.float32),
             mask=row_in[:, None])


@triton.jit
def _load_lse(LSE, off_bh, rows, N_Q):
    # Rows past N_Q and rows without any valid key (LSE = -inf) get +inf: exp2(s - LSE) is then 0.
    lse = tl.load(LSE + off_bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _bwd_step(k, v, key_ok, Q, DOut, LSE, Delta, DQAcc, off_bh, start_m, dk, dv, scale, scale_log2,
              stride_qm, stride_qd, stride_dm, stride_dd, N_Q,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block against the held key block: 5 matrix products (FlashAttention-2's count).
    dV += P^T dO and dK (unscaled) += dS^T Q accumulate in registers, all transposed; dQ += dS K
    (scaled) goes to the fp32 accumulator with atomic adds, since other key blocks add to it too."""
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = rows < N_Q
    q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_in[:, None], other=0.0)
    do = tl.load(DOut + rows[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=row_in[:, None], other=0.0)
    lse = _load_lse(LSE, off_bh, rows, N_Q)
    delta = tl.load(Delta + off_bh.to(tl.int64) * N_Q + rows, mask=row_in, other=0.0)
    # Recompute P^T from the saved LSE; masked keys get -inf, hence p exactly 0 (and dS exactly 0).
    sT = _dot(k, tl.trans(q), DOT_PRECISION)
    sT = tl.where(key_ok[:, None], sT * scale_log2, float("-inf"))
    pT = tl.exp2(sT - lse[None, :])
    dv += _dot(pT.to(do.dtype), do, DOT_PRECISION)
    dpT = _dot(v, tl.trans(do), DOT_PRECISION)
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)        # softmax backward: dS = P (dP - delta)
    dk += _dot(dsT, q, DOT_PRECISION)
    dq = _dot(tl.trans(dsT), k, DOT_PRECISION) * scale
    # Relaxed: the adds need no ordering against other memory traffic (acq_rel would fence).
    tl.atomic_add(DQAcc + (off_bh.to(tl.int64) * N_Q + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq,
                  mask=row_in[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd(Q, K, V, KeyMask, KeyEnd, DOut, LSE, Delta, DQAcc, DK, DV,
              scale, scale_log2,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_db, stride_dh, stride_dm, stride_dd,
              stride_mb, H, N_Q, N_K,
              stride_gb, stride_gh, stride_gn, stride_gd,  # dK and dV (contiguous, same shape)
              HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # Program (key block, batch * head): dK and dV of these keys, summed over ALL query blocks, and
    # these keys' share of dQ. Everything is computed transposed ([keys, queries]) so the key block
    # stays in registers.
    start_n, off_bh, b, h = _block_and_head(N_K, BLOCK_N, H)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k, v, key_ok = _key_block(K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, KeyMask, b,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, cols, offs_d, N_K, HAS_MASK)
    Q += b * stride_qb + h * stride_qh
    DOut += b * stride_db + h * stride_dh
    # A key block past the sample's last valid key gets dK = dV = 0 (and adds nothing to dQ)
    # without looping.
    q_end = N_Q
    if HAS_MASK:
        q_end = tl.where(start_n * BLOCK_N < tl.load(KeyEnd + b), N_Q, 0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if INTERPRET:
        start_m = 0
        while start_m < q_end:
            dk, dv = _bwd_step(k, v, key_ok, Q, DOut, LSE, Delta, DQAcc, off_bh, start_m, dk, dv, scale,
                               scale_log2, stride_qm, stride_qd, stride_dm, stride_dd, N_Q,
                               HEAD_DIM, BLOCK_M, DOT_PRECISION)
            start_m += BLOCK_M
    else:
        for start_m in range(0, q_end, BLOCK_M):
            dk, dv = _bwd_step(k, v, key_ok, Q, DOut, LSE, Delta, DQAcc, off_bh, start_m, dk, dv, scale,
                               scale_log2, stride_qm, stride_qd, stride_dm, stride_dd, N_Q,
                               HEAD_DIM, BLOCK_M, DOT_PRECISION)
    dk *= scale
    g_offs = b * stride_gb + h * stride_gh + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(DK + g_offs, dk.to(DK.dtype.element_ty), mask=(cols < N_K)[:, None])
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=(cols < N_K)[:, None])


_INTERPRETED = not isinstance(_attn_fwd, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------
def _configs(n_q, n_k, head_dim):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, fixed per shape: no autotuning, because
    none of this could be measured (no GPU); `python -m kernels.attention --sweep` times
    alternatives on a GPU and CONFIG_OVERRIDE takes the winner without editing this function.
    The interpreter (CPU tests) runs these same configs, so the tests check the launched tiling.

    Hopper (sm_90) reasoning, from the Triton fused-attention tutorial's H100 settings and the
    sm_90 compile of these kernels (`python -m kernels.attention --sass`):
    - forward: BLOCK_M = 128 queries per program (one warpgroup issues two m64 wgmma tiles)
      streaming BLOCK_N = 64 keys through 3 pipeline stages (3 * 2 * 64 * D * 2 bytes = 48 KiB at
      D = 64). Short query sets (the 50-token encoders, the 49-query decoder) waste most of a
      128-row block, so BLOCK_M drops to 64 when Nq <= 64; Nk <= 32 uses 32-key blocks.
      D = 128 doubles the accumulator: 8 warps keep it in registers without spilling.
    - backward: one kernel (FlashAttention-2's), 5 matrix products per tile pair, dQ through fp32
      atomic adds. A program holds BLOCK_N = 128 keys (8 warps) and streams BLOCK_M = 64 queries
      (64 x 64 at Nk <= 64, 4 warps): the fewest issued instructions per query-key pair of the
      tiles compiled (32-query tiles are too short for wgmma, so their dQ product runs on mma.sync
      through ldmatrix: 1124 warp instructions per 1k pairs at 32 x 64, 699 at 64 x 128; D = 128
      holds 255 registers without spilling). 2 stages: each step loads two tiles.
    - ALTERNATIVES (a 128-key forward, the 64-key backward) are compiled by --sass and timed by
      --sweep; whether they win is for a GPU to say.
    """
    if CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE
    fwd_m = 64 if n_q <= 64 else 128
    fwd_n = 32 if n_k <= 32 else 64
    fwd_warps = 8 if (head_dim == 128 and fwd_m == 128) else 4
    fwd_stages = 2 if head_dim == 128 else 3
    bwd = (64, 128, 8, 2) if n_k > 64 else (64, 64, 4, 2)
    return dict(fwd=(fwd_m, fwd_n, fwd_warps, fwd_stages), bwd=bwd)


CONFIG_OVERRIDE = None   # e.g. dict(fwd=(128, 64, 4, 3), bwd=(64, 128, 8, 2))
ALTERNATIVES = {"128-key fwd": ("fwd", (128, 128, 8, 2)), "64-key bwd": ("bwd", (64, 64, 4, 2))}
PREPROCESS_BLOCK_M = 64


def _dot_precision(dtype):
    # fp32 inputs (tests) use exact fp32 products; tf32 would cost ~1e-3 relative error.
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t):
    return tuple(t.stride())


def _on_device(t):
    """Launch on the tensor's own GPU, whichever device is current (a caller need not set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _keys_end(key_mask, q):
    """key_end[b] = 1 + index of the sample's last valid key (0 if none), int32 [B]; an empty
    tensor without a mask. Three small kernels: the forward computes it and the backward reuses it."""
    if key_mask is None:
        return torch.empty(0, dtype=torch.int32, device=q.device)
    n_k = key_mask.shape[1]
    positions = torch.arange(1, n_k + 1, device=key_mask.device, dtype=torch.int32)
    return torch.where(key_mask, positions, 0).amax(dim=1).to(torch.int32)


def _mask_args(key_mask, key_end, q):
    """(mask as uint8 [B, Nk], key_end, the mask's batch stride) for the kernels."""
    if key_mask is None:   # HAS_MASK=False: the kernels never read these two pointers
        return q, q, 0
    mask_u8 = key_mask.contiguous().view(torch.uint8)
    return mask_u8, key_end, mask_u8.stride(0)


def _triton_forward(q, k, v, key_mask, key_end, scale):
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    mask_u8, key_end, stride_mb = _mask_args(key_mask, key_end, q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = _configs(n_q, n_k, D)["fwd"]
    grid = (triton.cdiv(n_q, block_m) * B * H,)
    with _on_device(q):
        _attn_fwd[grid](q, k, v, mask_u8, key_end, out, lse, scale * _LOG2E,
                        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                        stride_mb, H, n_q, n_k,
                        HAS_MASK=key_mask is not None, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
                        DOT_PRECISION=_dot_precision(q.dtype), INTERPRET=_interpreting(),
                        num_warps=warps, num_stages=stages)
    return out, lse


def _triton_backward(do, q, k, v, out, lse, key_mask, key_end, scale):
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    mask_u8, key_end, stride_mb = _mask_args(key_mask, key_end, q)
    delta = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
    dq_acc = torch.empty((B, H, n_q, D), dtype=torch.float32, device=q.device)  # zeroed by the preprocess
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_m, block_n, warps, stages = _configs(n_q, n_k, D)["bwd"]
    with _on_device(q):
        _attn_bwd_preprocess[(triton.cdiv(n_q, PREPROCESS_BLOCK_M) * B * H,)](
            out, do, delta, dq_acc, *_strides(out), *_strides(do), H, n_q, HEAD_DIM=D,
            BLOCK_M=PREPROCESS_BLOCK_M)
        _attn_bwd[(triton.cdiv(n_k, block_n) * B * H,)](
            q, k, v, mask_u8, key_end, do, lse, delta, dq_acc, dk, dv, scale, scale * _LOG2E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), stride_mb, H, n_q, n_k, *_strides(dk),
            HAS_MASK=key_mask is not None, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=_dot_precision(q.dtype), INTERPRET=_interpreting(),
            num_warps=warps, num_stages=stages)
    return dq_acc.to(q.dtype), dk, dv


def _unit_last_stride(t):
    """Any strides work (views of a fused qkv projection need no copy); a head dim that is not
    contiguous would make every load a gather, so that case is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, lse, key_end) of the forward kernel; key_end goes to the backward with lse."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    key_end = _keys_end(key_mask, q)
    return (*_triton_forward(q, k, v, key_mask, key_end, scale), key_end)


def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_mask: Optional[torch.Tensor], key_end: torch.Tensor,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) of the backward kernels."""
    q, k, v, dout = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), _unit_last_stride(dout)
    return _triton_backward(dout, q, k, v, out, lse, key_mask, key_end, scale)


def _save_for_backward(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    ctx.save_for_backward(q, k, v, *output, key_mask)
    ctx.scale = scale


class _MaskedAttention(torch.autograd.Function):
    """Eager path. A plain autograd.Function: its dispatch costs ~4x less than a custom op's (26 vs
    121 us per forward call on the 2-core dev CPU), which counts at the decoder's small shapes."""
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale):
        out, lse, key_end = _attention_fwd(q, k, v, key_mask, scale)
        _save_for_backward(ctx, (q, k, v, key_mask, scale), (out, lse, key_end))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, key_end, key_mask = ctx.saved_tensors
        return (*_attention_bwd(dout, q, k, v, out, lse, key_mask, key_end, ctx.scale), None, None)


# torch.compile path: the same two functions as torch custom ops, so the compiler sees each as one opaque
# node and never traces the launch code (or the interpreter); register_autograd pairs them.
_attention_fwd_op = torch.library.custom_op("rsmim::masked_attention_fwd", _attention_fwd, mutates_args=())
_attention_bwd_op = torch.library.custom_op("rsmim::masked_attention_bwd", _attention_bwd, mutates_args=())


@_attention_fwd_op.register_fake
def _(q, k, v, key_mask, scale):
    # Contiguous, as the real op; key_end is [B] int32 with a mask, empty without.
    key_end = q.new_empty((0,) if key_mask is None else (q.shape[0],), dtype=torch.int32)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), key_end


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_mask, key_end, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _op_backward(ctx, dout, _dlse, _dkey_end):
    q, k, v, out, lse, key_end, key_mask = ctx.saved_tensors
    return (*_attention_bwd_op(dout, q, k, v, out, lse, key_mask, key_end, ctx.scale), None, None)


_attention_fwd_op.register_autograd(_op_backward, setup_context=_save_for_backward)


# ------------------------------------------------------------------------------------------------
# Torch paths
# ------------------------------------------------------------------------------------------------
def _valid_samples(key_mask):
    """Per sample: does it have at least one valid key? And a mask that never masks a whole sample.

    Softmax over no keys is 0/0. Both torch paths attend to every key of such a sample instead
    (finite everywhere, so no NaN reaches any gradient) and multiply its output by 0, which also
    makes every gradient through it exactly 0."""
    valid = key_mask.any(dim=1)
    return valid, key_mask | ~valid[:, None]


def attention_reference(q, k, v, key_mask=None, scale=None):
    """The op in plain torch math, float32 (float64 inputs stay float64); output in q's dtype."""
    _check_inputs(q, k, v, key_mask, "torch")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    scores = (qf @ kf.transpose(-2, -1)) * scale                        # [B, H, Nq, Nk]
    if key_mask is None:
        return (scores.softmax(dim=-1) @ vf).to(q.dtype)
    valid, safe_mask = _valid_samples(key_mask)
    scores = scores.masked_fill(~safe_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ vf
    return (out * valid[:, None, None, None].to(compute)).to(q.dtype)


def _torch_attention(q, k, v, key_mask, scale):
    """CPU path: SDPA with the boolean mask (broadcast over heads and queries)."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    valid, safe_mask = _valid_samples(key_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :], scale=scale)
    return out * valid[:, None, None, None].to(out.dtype)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, key_mask, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, Nk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Nq, D] and k/v [B, H, Nk, D] must agree on B, H and D, "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"Nq and Nk must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor [B, Nk] (True = attend), got "
                            f"{getattr(key_mask, 'dtype', type(key_mask).__name__)}")
        if tuple(key_mask.shape) != (q.shape[0], k.shape[2]):
            raise ValueError(f"key_mask must have shape [B, Nk] = {(q.shape[0], k.shape[2])}, "
                             f"got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")
    if backend == "triton":
        if q.shape[3] not in HEAD_DIMS:
            raise ValueError(f"the triton backend supports head dims {HEAD_DIMS}, got D = {q.shape[3]}")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the triton backend supports fp16, bf16 and fp32, got {q.dtype}")
        if q.device.type == "cpu" and not _interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is imported; use backend='torch' (or 'auto') on the CPU")


def masked_attention(q, k, v, key_mask=None, scale=None, backend="auto"):
    """softmax(q k^T * scale, keys masked per sample) v -> [B, H, Nq, D] in q's dtype.

    q [B, H, Nq, D]; k, v [B, H, Nk, D]; key_mask bool [B, Nk], True = attend (None = all keys);
    scale defaults to D ** -0.5. Samples with no valid key return 0 and pass zero gradient.
    backend: "auto" (triton on CUDA, torch elsewhere), "triton" or "torch"."""
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    _check_inputs(q, k, v, key_mask, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return _torch_attention(q, k, v, key_mask, scale)
    if torch.compiler.is_compiling():
        return _attention_fwd_op(q, k, v, key_mask, scale)[0]
    return _MaskedAttention.apply(q, k, v, key_mask, scale)


# ------------------------------------------------------------------------------------------------
# Offline performance record (no GPU needed): the launched kernels compiled for sm_90 as the JIT would
# ------------------------------------------------------------------------------------------------
def _inputs_like_scripts(B, H, n_q, n_k, D, dtype, masked, device="cpu"):
    """q, k, v, key_mask, dout with the scripts' layouts (so the JIT specialises the same strides):
    self-attention q, k, v are views of one fused qkv projection [B, N, 3, H, D]; cross-attention
    q is a [B, Nq, H, D] projection and k, v views of a fused [B, Nk, 2, H, D] one; dout arrives in
    the [B, N, H, D] layout of the head merge that follows. Values uninitialised."""
    if n_q == n_k:
        q, k, v = torch.empty(B, n_q, 3, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.empty(B, n_q, H, D, dtype=dtype, device=device).transpose(1, 2)
        k, v = torch.empty(B, n_k, 2, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.ones(B, n_k, dtype=torch.bool, device=device) if masked else None
    return q, k, v, mask, torch.empty(B, n_q, H, D, dtype=dtype, device=device).transpose(1, 2)


def compile_for_target(n_q=197, n_k=197, head_dim=64, dtype=torch.bfloat16, has_mask=True, heads=12, arch=90):
    """The kernels that one forward + backward launches at this shape, compiled for CUDA sm_<arch>
    without a GPU, with the JIT's specialisation of the actual launch arguments (`kernels.
    compile_like_jit`). Needs TRITON_INTERPRET unset. Returns [(kernel name, launch keyword
    arguments, triton CompiledKernel)] in launch order."""
    from kernels import capture_launches, compile_like_jit
    if _interpreting():
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset")
    q, k, v, mask, dout = _inputs_like_scripts(2, heads, n_q, n_k, head_dim, dtype, has_mask)
    scale = head_dim ** -0.5
    with capture_launches(sys.modules[__name__], ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd"]) as launches:
        out, lse, key_end = _attention_fwd(q, k, v, mask, scale)
        _attention_bwd(dout, q, k, v, out, lse, mask, key_end, scale)
    return [(fn.__name__, kwargs, compile_like_jit(fn, args, kwargs, arch)) for fn, args, kwargs in launches]


def sass_report(shapes=None, dtype=torch.bfloat16):
    """Markdown table: per kernel variant launched at the scripts' shapes (masked, bf16), its
    resources and the SASS of its main loop, one loop iteration = one tile pair of BLOCK_M queries x
    BLOCK_N keys. `warp instr / 1k scores` = loop instructions x warps x 1024 / (BLOCK_M x BLOCK_N):
    the issue cost of 1024 query-key pairs, comparable across tile shapes and kernels."""
    global CONFIG_OVERRIDE
    from kernels import sass_stats
    shapes = shapes or [s[1:] for s in BENCH_SHAPES]
    runs = [(f"({n_q},{n_k},{D})", (n_q, n_k, D, H), None, None) for H, n_q, n_k, D in shapes]
    H, n_q, n_k, D = shapes[0]
    base = _configs(n_q, n_k, D)
    runs += [(f"({n_q},{n_k},{D}) {alt}", (n_q, n_k, D, H), dict(base, **{part: cfg}), part)
             for alt, (part, cfg) in ALTERNATIVES.items()]
    print("| kernel | shape (Nq,Nk,D) | BLOCK_M x BLOCK_N | warps / stages | regs | shared B | spill B | "
          "dots | loop instr | loop HGMMA | loop async copies | loop atomics | warp instr / 1k scores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    seen = set()
    for label, (n_q, n_k, D, H), override, part in runs:
        CONFIG_OVERRIDE = override
        try:
            compiled = compile_for_target(n_q, n_k, D, dtype, True, H)
        finally:
            CONFIG_OVERRIDE = None
        for name, kwargs, kernel in compiled:
            # Each distinct kernel once (Nq and Nk are not specialised: 197 and 785 share them); an
            # alternative shows only the kernel it changes.
            if (kernel.hash in seen and not override) or (override and name != f"_attn_{part}"):
                continue
            seen.add(kernel.hash)
            st = sass_stats(kernel)
            bm, bn = kwargs["BLOCK_M"], kwargs.get("BLOCK_N")
            loop = st["loop"]
            cells = (f"{loop['instrs']} | {loop['mma']} | {loop['async_copy']} | {loop['atomic']} | "
                     f"{loop['instrs'] * st['warps'] * 1024 / (bm * bn):.0f}") if loop and bn else \
                f"- ({st['kernel']['instrs']} / program) | - | - | - | -"
            print(f"| {name} | {label} | {bm} x {bn or '-'} | {st['warps']} / {st['stages']} | {st['regs']} | "
                  f"{st['shared']} | {st['local']} | {st['dots']} | {cells} |", flush=True)


# ------------------------------------------------------------------------------------------------
# Benchmark: python -m kernels.attention [--dtype bf16] [--sweep]
# ------------------------------------------------------------------------------------------------
BENCH_SHAPES = [  # (B, H, Nq, Nk, D): the rsmim scripts' attention calls
    (256, 12, 197, 197, 64),   # ViT-B/16 at 224 px, full token set
    (256, 12, 50, 50, 64),     # ViT-B encoder on the visible 25% of the tokens (MAE-style)
    (64, 6, 785, 785, 64),     # ViT-S/8 at 224 px
    (256, 16, 197, 197, 32),   # 512-wide decoder, 16 heads
    (256, 16, 49, 30, 32),     # SelectiveMAE cross-attention decoder: 49 queries, 30 keys
]


def _bench_inputs(B, H, n_q, n_k, D, dtype, masked, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=g).requires_grad_()
               for n in (n_q, n_k, n_k))
    dout = torch.randn(B, H, n_q, D, device=device, dtype=dtype, generator=g)
    mask = None
    if masked:   # a random 75% of the keys, key 0 (the [CLS] token) always kept
        mask = torch.rand(B, n_k, device=device, generator=g) < 0.75
        mask[:, 0] = True
    return q, k, v, dout, mask


def _implementations(q, k, v, mask, flex=True):
    """name -> callable returning the attention output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    impls = {"ours (triton)": lambda: masked_attention(q, k, v, mask, backend="triton")}
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        impls[name] = call
    if not flex:
        return impls
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return impls
    flex = torch.compile(flex_attention, dynamic=False)
    if mask is None:
        impls["flex (compiled)"] = lambda: flex(q, k, v)
    else:
        B, _, n_q, _ = q.shape

        def key_mask_mod(b, h, q_idx, kv_idx):
            return mask[b, kv_idx]

        def build():
            return create_block_mask(key_mask_mod, B, None, n_q, k.shape[2], device=q.device)
        block_mask = build()
        impls["flex (compiled), block mask prebuilt"] = lambda: flex(q, k, v, block_mask=block_mask)
        impls["flex (compiled), block mask per call"] = lambda: flex(q, k, v, block_mask=build())
    return impls


def _time(fn, q, k, v, dout):
    """Median, 20% and 80% quantiles in ms of forward and of forward+backward."""
    from triton.testing import do_bench
    fwd = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    both = do_bench(lambda: fn().backward(dout), grad_to_none=[q, k, v], quantiles=[0.5, 0.2, 0.8])
    return fwd, both


def _sweep(shapes, dtype):
    """Time alternative block configs of our kernels (one kernel varied at a time) on this GPU."""
    global CONFIG_OVERRIDE
    fwd_opts = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3), (64, 32, 4, 4)]
    bwd_opts = [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2)]
    for B, H, n_q, n_k, D in shapes:
        q, k, v, dout, mask = _bench_inputs(B, H, n_q, n_k, D, dtype, masked=True)
        base = _configs(n_q, n_k, D)
        print(f"\nsweep ({B},{H},{n_q},{n_k},{D}) masked; default {base}")
        for part, opts in (("fwd", fwd_opts), ("bwd", bwd_opts)):
            for opt in opts:
                CONFIG_OVERRIDE = dict(base, **{part: opt})
                try:
                    fwd, both = _time(lambda: masked_attention(q, k, v, mask, backend="triton"), q, k, v, dout)
                    print(f"  {part:5s} {str(opt):18s} fwd {fwd[0]:.3f} ms  fwd+bwd {both[0]:.3f} ms")
                except Exception as exc:   # e.g. out of shared memory
                    print(f"  {part:5s} {str(opt):18s} failed: {type(exc).__name__}: {str(exc)[:80]}")
                finally:
                    CONFIG_OVERRIDE = None


def main():
    import argparse
    import datetime
    parser = argparse.ArgumentParser(description="Benchmark masked attention forward+backward on the GPU.")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype")
    parser.add_argument("--sweep", action="store_true", help="also time alternative block configs of ours")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    parser.add_argument("--sass", action="store_true",
                        help="no benchmark: compile the launched kernels for sm_90 as the JIT would and print "
                             "registers, shared memory and SASS counts per loop iteration (no GPU needed)")
    args = parser.parse_args()
    if args.sass:
        sass_report()
        return
    if not torch.cuda.is_available():
        print("python -m kernels.attention needs CUDA: no GPU visible, nothing measured.")
        return
    if _interpreting():
        print("warning: TRITON_INTERPRET=1 is set: the Triton timings are the interpreter's")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"# masked attention, forward+backward, {args.dtype}; device {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("# median ms (triton.testing.do_bench), [20%, 80%] quantiles; err = max |out - reference| "
          "on the forward; n/a = backend refused these inputs")
    print(f"| {'(B,H,Nq,Nk,D)':22s} | mask | {'implementation':38s} | fwd ms | fwd+bwd ms [20%, 80%] | err |")
    print(f"|{'-' * 24}|------|{'-' * 40}|--------|------------------------|-----|")
    for B, H, n_q, n_k, D in BENCH_SHAPES:
        for masked in (False, True):
            q, k, v, dout, mask = _bench_inputs(B, H, n_q, n_k, D, dtype, masked)
            ref = attention_reference(q.detach(), k.detach(), v.detach(), mask).float()
            for name, fn in _implementations(q, k, v, mask, flex=not args.no_flex).items():
                label = f"({B},{H},{n_q},{n_k},{D})"
                try:
                    err = (fn().float() - ref).abs().max().item()
                    fwd, both = _time(fn, q, k, v, dout)
                    print(f"| {label:22s} | {'yes' if masked else 'no':4s} | {name:38s} | {fwd[0]:6.3f} | "
                          f"{both[0]:7.3f} [{both[1]:.3f}, {both[2]:.3f}] | {err:.1e} |")
                except Exception as exc:
                    print(f"| {label:22s} | {'yes' if masked else 'no':4s} | {name:38s} | n/a    | n/a "
                          f"({type(exc).__name__}) | - |")
            del q, k, v, dout, mask, ref
            torch.cuda.empty_cache()
    if args.sweep:
        _sweep(BENCH_SHAPES, dtype)


if __name__ == "__main__":
    main()
