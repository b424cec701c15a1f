"""One rule for every numeric comparison in the tests.

Two computations of the same math in a different order (a kernel and its reference, a cached and
an uncached forward, a converted model and its reference) differ by rounding, never by more. The
rounding error of a sum of K terms grows like sqrt(K) eps times the size of the terms (random
signs), and the terms are about as large as the biggest value of the result. So the tolerance is

    max |actual - expected|  <=  ulps * eps(dtype) * sqrt(reduction) * max |expected|

with eps the dtype's machine epsilon (2^-23 fp32, 2^-7 bf16), `reduction` the length of the
longest sum on the path that is carried out in `dtype` (a dot product's K; K * n_layers for a
whole model, since the layers add their errors), and `ulps` a small constant for the few
roundings per element that are not sums (4 by default: a product, an exp, a store). It depends on
the dtype and on the magnitudes only, never on what one machine's SIMD kernels happened to give:
ATen's AVX-512, AVX2 and scalar kernels, and one or many threads, all round differently within
this bound.

16-bit inputs: the sums accumulate in fp32 on both sides (the kernels upcast after loading, the
CPU's bf16 matmuls accumulate in fp32), and sqrt(K) fp32 eps is far below one bf16 eps; where a
reference rounds the terms of a sum to bf16 first, K terms each off by a relative eps add up to
sqrt(K) eps of a term, about one eps of the result. So the error is that of a few bf16
roundings per element: both sides round their output to bf16 (half an eps each), the Triton
interpreter truncates fp32 -> bf16 stores instead of rounding them (one eps), and the PyTorch references
round intermediates the kernels keep in fp32 (silu before the product, the adapter's
projections, the matmuls' outputs). Hence reduction=1 and ulps=4 for bf16.

Where the reference is tiny compared with the numbers that made it (cancellation), pass
`scale=` the size of those numbers. Comparisons that are exact by construction (round trips,
copies, integer ids) use torch.equal, not this.
"""
import math

import torch


# Weights after AdamW steps: each update lr * m / (sqrt(v) + eps) carries the relative rounding
# error of m plus half that of v, so up to twice the gradient's own (which `reduction` counts);
# comparisons of trained weights allow twice the default ulps for it.
ADAM_ULPS = 2 * 4.0


def _magnitude(expected, scale):
    if scale is not None:
        return float(scale.detach()) if torch.is_tensor(scale) else float(scale)
    return expected.detach().abs().max().item() if expected.numel() else 0.0


def tolerance(expected, dtype=None, reduction=1, ulps=4.0, scale=None):
    """The largest absolute error allowed against `expected` (see the module docstring)."""
    expected = expected if torch.is_tensor(expected) else torch.tensor(expected, dtype=torch.float64)
    dtype = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    return ulps * torch.finfo(dtype).eps * math.sqrt(max(reduction, 1)) * max(_magnitude(expected, scale), 1e-30)


def assert_close(actual, expected, *, dtype=None, reduction=1, ulps=4.0, scale=None, name=""):
    """Assert same shape and max |actual - expected| within tolerance(); the message says by how much."""
    # Python numbers are float64 (torch.as_tensor alone would round them to float32)
    actual, expected = (x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64) for x in (actual, expected))
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = tolerance(expected, dtype, reduction, ulps, scale)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= tol, (f"{name}: max error {err:.3g} > tolerance {tol:.3g} = {ulps} ulps x sqrt({reduction}) "
                        f"x magnitude {_magnitude(expected, scale):.3g}")
