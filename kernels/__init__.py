"""Triton kernels of rsmim, one op per file, each with its torch reference and a benchmark.

- `kernels.hog`: fused HOG patch scoring (SelectiveMAE's patch ranking, MaskFeat features).
- `kernels.attention`: FlashAttention-2 style attention with a per-sample key mask.
"""
