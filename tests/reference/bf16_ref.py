"""bf16_ref.py: SCMOE_PRECISION_BF16's GEMMs for the oracles (moe_ref.py, pair_ref.py), in float64.

The library rounds both operands of each such GEMM to bf16 (nearest even) and sums the products in fp32,
forward and backward: dA = alpha r(dC) r(B)^T and dB = alpha r(A)^T r(dC), with r() the rounding of the
fp32 value. matmul() is that GEMM as an autograd function, so the reference rounds the same operands in
backward too and only the summation differs (float64 here, fp32 in C).

Tolerance (BF16_TOL, relative to max|ref| as Report.compare measures). Two sources:
  1. the fp32 sums, as in fp32 mode: below the fp32 oracles' tolerances (1e-4 outputs, 1e-3 gradients);
  2. rounding flips: an operand C holds in fp32 differs from the reference's by ~1e-6 relative, so where
     it lies that close to the midpoint between two bf16 values the two round apart, by one bf16 ulp
     <= 2^-7 |x| (bf16 keeps 8 significant bits: half an ulp, 2^-8, is the rounding bound u). One flip
     moves one product of a reduction by <= 2^-7 |x_k w_k|. With the tests' data (LayerNorm outputs
     |x| <= ~3, fan-in-scaled weights |w| <= sqrt(3/K), outputs max|y| >~ 1) that is
     <= 2^-7 * 3 sqrt(3/K) <= 2^-7 * 1.84 relative for the shortest reduction, K = 8 (a head's
     width); flips occur at a rate of ~1e-6 / 2^-8 ~ 3e-4 per operand element, so two rarely meet in
     one output. Hence BF16_TOL = 2 * 2^-7 (one flip at the worst K, plus the fp32 part), for outputs
     and gradients alike. A real error (an operand not rounded, or rounded where the library keeps
     fp32) shows as ~2^-8 relative on most outputs of a GEMM and is caught by the companion check in
     the C tests that bf16 differs from fp32 at all.
"""
import torch

BF16_TOL = 2.0 * 2.0 ** -7


def round_bf16(t):
    """The fp32 value of t rounded to bf16 (nearest even), as float64: what the C GEMM reads."""
    return t.detach().to(torch.float32).to(torch.bfloat16).to(torch.float64)


class _MatmulBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, alpha):
        ra, rb = round_bf16(a), round_bf16(b)
        ctx.save_for_backward(ra, rb)
        ctx.alpha = alpha
        return alpha * torch.matmul(ra, rb)

    @staticmethod
    def backward(ctx, dc):
        ra, rb = ctx.saved_tensors
        rdc = round_bf16(dc)
        da = ctx.alpha * torch.matmul(rdc, rb.transpose(-1, -2))
        db = ctx.alpha * torch.matmul(ra.transpose(-1, -2), rdc)
        return da, db, None


def matmul(a, b, bf16, alpha=1.0):
    """alpha a @ b: plain float64, or the library's bf16 GEMM when bf16."""
    if bf16:
        return _MatmulBF16.apply(a, b, alpha)
    return alpha * (a @ b) if alpha != 1.0 else a @ b
