"""Every Triton kernel in kernels.py against the plain PyTorch math the model runs without it
(model.py's *_torch functions, moe.adapter_experts_loop), forward and backward.

conftest.py sets TRITON_INTERPRET=1, so the kernels run on the CPU. The interpreter spends about
1 ms per program instance, so the shapes are small; they are chosen to be no multiple of any
block size and to make the kernels' loops run more than once.
"""
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import kernels

from model import apply_rope_torch, cross_entropy, rms_norm_torch, swiglu_torch
from moe import adapter_experts_loop
from tolerance import assert_close


def linear_cross_entropy_torch(h, weight, targets, ignore_index=-100):
    """Transformer.forward's plain path: the LM head (F.linear), then model.cross_entropy."""
    return cross_entropy(F.linear(h, weight), targets, ignore_index)


def run(fn, inputs, *args, grad_outputs=None, **kwargs):
    """fn's outputs and the gradients of <outputs, grad_outputs> for the inputs that need one."""
    out = fn(*inputs, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:  # fixed random cotangents, one per output
        gen = torch.Generator().manual_seed(1)  # drawn on the CPU: the same cotangents on any device
        grad_outputs = [torch.randn(o.shape, generator=gen, device="cpu").to(o.device, o.dtype) for o in outs]
    needs = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(outs, needs, grad_outputs)
    return list(outs) + list(grads)


def check(kernel, reference, inputs, *args, reduction=1, **kwargs):
    """kernel and reference agree on every output and every input gradient, in dtype and value.

    reduction: the longest sum in the computation (tolerance.py); it counts for fp32 only, since
    16-bit inputs are summed in fp32 on both sides."""
    dtype = max((x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()),
                key=lambda d: torch.finfo(d).eps)
    reduction = reduction if dtype == torch.float32 else 1
    results = zip(run(kernel, inputs, *args, **kwargs), run(reference, inputs, *args, **kwargs), strict=True)
    for i, (a, b) in enumerate(results):
        name = f"result {i} (outputs, then input gradients)"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close(a, b, dtype=dtype, reduction=reduction, name=name)


def randn(*shape, dtype=torch.float32, grad=True, scale=1.0):
    x = (torch.randn(*shape) * scale).to(dtype)
    return x.requires_grad_(grad)


DTYPES = [torch.float32, torch.bfloat16]


# -----------------------------------------------------------------------------------------------
# use_triton


def test_use_triton_modes(monkeypatch):
    x = torch.zeros(2, device="cpu")  # also under PESC_TEST_DEVICE=cuda
    monkeypatch.delenv("PESC_KERNELS", raising=False)
    assert not kernels.use_triton(x)  # auto: CPU tensors stay on the plain PyTorch path
    assert kernels.use_triton(types.SimpleNamespace(is_cuda=True))  # auto + CUDA + Triton
    monkeypatch.setenv("PESC_KERNELS", "torch")
    assert not kernels.use_triton(types.SimpleNamespace(is_cuda=True))
    monkeypatch.setenv("PESC_KERNELS", "triton")
    assert kernels.use_triton(x)  # CPU works here because the interpreter is on
    monkeypatch.setenv("PESC_KERNELS", "Triton")
    with pytest.raises(ValueError, match="PESC_KERNELS"):
        kernels.use_triton(x)


def test_use_triton_errors(monkeypatch):
    x = torch.zeros(2, device="cpu")  # also under PESC_TEST_DEVICE=cuda
    monkeypatch.setenv("PESC_KERNELS", "triton")
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_triton(x)
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.use_triton(x)
    monkeypatch.setenv("PESC_KERNELS", "auto")
    assert not kernels.use_triton(types.SimpleNamespace(is_cuda=True))


def test_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("kernels_without_triton", kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert not module.use_triton(types.SimpleNamespace(is_cuda=True))


# -----------------------------------------------------------------------------------------------
# rms_norm: (3, 50, 48) is 150 rows = 3 blocks of 64 over 2 persistent backward programs;
# (1, 1, 200) is a single token with a 256-wide block.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 50, 48), (1, 1, 200)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm(dtype, shape, residual, weight_grad):
    torch.manual_seed(0)
    x = randn(*shape, dtype=dtype)
    r = randn(*shape, dtype=dtype) if residual else None
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).requires_grad_(weight_grad)
    check(kernels.rms_norm, rms_norm_torch, (x, w, 1e-5, r), reduction=shape[-1])  # the mean of squares


def test_rms_norm_fp32_weight_on_bf16():
    # a bf16 activation times an fp32 weight is fp32, in the reference and in the kernel
    torch.manual_seed(0)
    x, w = randn(4, 40, dtype=torch.bfloat16), randn(40)
    out = kernels.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    check(kernels.rms_norm, rms_norm_torch, (x, w, 1e-6))  # bf16 x: the mean sums in fp32 (reduction 1)


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_rms_norm_mixed_residual_dtype(x_dtype, r_dtype):
    # full fine-tuning under bf16 autocast on a GPU: a layer's bf16 output meets the fp32 residual
    # stream (fp32 embeddings); h = x + residual is fp32 and each input gets its gradient in its dtype
    torch.manual_seed(0)
    x, r, w = randn(3, 50, 48, dtype=x_dtype), randn(3, 50, 48, dtype=r_dtype), randn(48)
    out, h = kernels.rms_norm(x, w, 1e-5, r)
    assert out.dtype == h.dtype == torch.float32
    check(kernels.rms_norm, rms_norm_torch, (x, w, 1e-5, r))  # one input is bf16: reduction 1
    dx, dr = torch.autograd.grad(kernels.rms_norm(x, w, 1e-5, r)[0].sum(), (x, r))
    assert dx.dtype == x_dtype and dr.dtype == r_dtype


@pytest.mark.parametrize("used", ["out", "h"])
def test_rms_norm_one_output_used(used):
    # backward receives None for the unused output
    torch.manual_seed(0)
    x, r, w = randn(5, 24), randn(5, 24), randn(24)
    grads = []
    for fn in (kernels.rms_norm, rms_norm_torch):
        out, h = fn(x, w, 1e-5, r)
        grads.append(torch.autograd.grad((out if used == "out" else h).sum(), (x, r, w), allow_unused=True))
    for a, b in zip(*grads):
        if b is None:  # the weight does not reach h
            assert a is None or not a.any()
        else:
            assert_close(a, b, reduction=24, name=used)  # the weight gradient sums 5 rows, the rest 24 columns


# -----------------------------------------------------------------------------------------------
# swiglu: 1500 elements = 2 blocks of 1024; a and b as halves of one tensor (non-contiguous).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "chunks", "single"])
def test_swiglu(dtype, layout):
    torch.manual_seed(0)
    if layout == "chunks":  # a and b are the two halves of a fused projection's output
        def halves(fn):
            return lambda ab: fn(*ab.chunk(2, dim=-1))
        check(halves(kernels.swiglu), halves(swiglu_torch), (randn(3, 5, 200, dtype=dtype),))
    else:
        shape = (3, 5, 100) if layout == "contiguous" else (1, 1, 1)
        check(kernels.swiglu, swiglu_torch, (randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)))


# -----------------------------------------------------------------------------------------------
# apply_rope: head dim 24 (a half of 12, not a power of two), 3 heads; q taken out of a fused
# qkv projection is a strided view, and the gradient flows back into the fused tensor.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_view"])
def test_apply_rope(dtype, cos_batch, layout):
    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 24
    angles = torch.randn(cos_batch, T, hd // 2) * 3
    cos, sin = angles.cos(), angles.sin()
    qkv = layout == "qkv_view"
    base = randn(B, T, (3 if qkv else 1) * H * hd, dtype=dtype)

    def on_view(fn):  # x (B, T, H, hd): the k part of qkv, or all of base
        return lambda base, cos, sin: fn(base.view(B, T, -1, hd)[:, :, H:2 * H] if qkv else
                                         base.view(B, T, H, hd), cos, sin)
    check(on_view(kernels.apply_rope), on_view(apply_rope_torch), (base, cos, sin))  # no sums: reduction 1


def test_apply_rope_rejects_bad_cos():
    x, cos = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.apply_rope(x, cos, cos)


# -----------------------------------------------------------------------------------------------
# linear_cross_entropy: N=37, D=32, V=300 makes chunks of 4 rows (10 chunks, the last short);
# V=5000 takes two passes of the 4096-wide vocab block.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("N,V", [(37, 300), (5, 5000), (1, 300)])
def test_linear_cross_entropy(dtype, weight_grad, N, V):
    torch.manual_seed(0)
    h = randn(N, 32, dtype=dtype)
    w = torch.randn(V, 32) * 0.3
    w[-200:] *= 4  # the largest logits sit in the last vocab block: the running sum must rescale
    w = w.to(dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, V, (N,))
    targets[1::3] = -100  # some ignored positions (the prompt, in instruction tuning)
    grad_loss = [torch.tensor(2.0)]  # backward must scale by the incoming gradient
    # the longest sums: d h over V logits, the log-sum-exp over V, d weight over N rows
    check(kernels.linear_cross_entropy, linear_cross_entropy_torch, (h, w, targets), grad_outputs=grad_loss,
          reduction=max(V, N))


def test_linear_cross_entropy_all_ignored_and_custom_index():
    torch.manual_seed(0)
    h, w = randn(6, 16), randn(50, 16)
    for ignore, targets in [(-100, torch.full((6,), -100)), (7, torch.tensor([7, 3, 7, 0, 49, 7]))]:
        check(kernels.linear_cross_entropy, linear_cross_entropy_torch, (h, w, targets), ignore_index=ignore, reduction=50)
    loss = kernels.linear_cross_entropy(h, w, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_linear_cross_entropy_no_grad():
    torch.manual_seed(0)
    h, w, targets = randn(9, 16), randn(40, 16), torch.randint(0, 40, (9,))
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h, w, targets)
    assert not loss.requires_grad
    assert_close(loss, linear_cross_entropy_torch(h, w, targets).detach(), reduction=40)  # log-sum-exp over V


# -----------------------------------------------------------------------------------------------
# adapter_experts: D=100 (two 64-wide D tiles), r=24 (one 32-wide r tile, masked) unless stated.


def routing(N, E, k, dtype, only=None):
    """Top-k routing of random logits: weights (N, k) with a gradient, experts (N, k)."""
    logits = torch.randn(N, E)
    if only is not None:  # send every token to these experts only
        mask = torch.full((E,), float("-inf"))
        mask[only] = 0.0
        logits = logits + mask
    w, experts = logits.topk(k, dim=-1)
    return w.softmax(-1).to(dtype).requires_grad_(), experts


def adapters(E, D, R, dtype, grad=True):
    """down (E, R, D), up (E, D, R), scaled like nn.Linear's init so activations stay O(1)."""
    down = randn(E, R, D, dtype=dtype, grad=grad, scale=D ** -0.5)
    return down, randn(E, D, R, dtype=dtype, grad=grad, scale=R ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [4, 8])
@pytest.mark.parametrize("k", [1, 2])
def test_adapter_experts(dtype, E, k):
    torch.manual_seed(0)
    N, D, R = 20, 100, 24
    y = randn(N, D, dtype=dtype)
    weights, experts = routing(N, E, k, dtype)
    down, up = adapters(E, D, R, dtype)
    # the longest sums: D_e y over D columns, d down_e over the (<= N) rows routed to e
    check(kernels.adapter_experts, adapter_experts_loop, (y, weights, experts, down, up), 0.25, reduction=max(N, D))


@pytest.mark.parametrize("case", ["idle_experts", "one_expert", "single_token", "small_r", "wide_r", "big_batch",
                                  "frozen"])
def test_adapter_experts_routing_cases(case):
    torch.manual_seed(0)
    N, D, R, E, k, only, grad = 20, 100, 24, 8, 2, None, True
    if case == "idle_experts":  # experts 0, 2, 4, 6 get no token: their gradients are zero
        only = [1, 3, 5, 7]
    elif case == "one_expert":  # 40 rows on expert 5: three 16-row blocks, a full expert loop
        N, k, only = 40, 1, [5]
    elif case == "single_token":
        N = 1
    elif case == "small_r":  # r=8 < 16, padded by masks up to the tl.dot minimum
        R = 8
    elif case == "wide_r":  # r=80 > 64: several r tiles, so the partial sums over r are exercised
        R = 80
    elif case == "big_batch":  # >= 256 rows per expert on average: the 64-row tiles
        N, D, R, E = 600, 32, 16, 4
    elif case == "frozen":  # adapters without gradients: only y and the routing weights
        grad = False
    y = randn(N, D)
    weights, experts = routing(N, E, k, torch.float32, only)
    down, up = adapters(E, D, R, torch.float32, grad)
    check(kernels.adapter_experts, adapter_experts_loop, (y, weights, experts, down, up), 0.5, reduction=max(N, D, R))
    if case == "idle_experts":
        _, _, ddown, dup = run(kernels.adapter_experts, (y, weights, experts, down, up), 0.5)[1:]
        assert not ddown[0::2].any() and not dup[0::2].any() and ddown[1::2].all()


def test_adapter_experts_fp32_weights_bf16_activations():
    # moe.route returns fp32 routing weights while the model runs in bf16; the kernel reads
    # them as they are, the reference casts them to y's dtype
    torch.manual_seed(0)
    y = randn(20, 100, dtype=torch.bfloat16)
    weights, experts = routing(20, 8, 2, torch.float32)
    down, up = adapters(8, 100, 24, torch.bfloat16)
    check(kernels.adapter_experts, adapter_experts_loop, (y, weights, experts, down, up), 0.25)  # bf16: reduction 1


def test_adapter_experts_dropout_off():
    # training with p=0, or p>0 outside training, is the plain adapter
    torch.manual_seed(0)
    y = randn(12, 40)
    weights, experts = routing(12, 4, 2, torch.float32)
    down, up = adapters(4, 40, 16, torch.float32)
    for p, training in [(0.0, True), (0.3, False)]:
        def kernel(*args):
            return kernels.adapter_experts(*args, dropout_p=p, training=training)
        check(kernel, adapter_experts_loop, (y, weights, experts, down, up), 0.25, reduction=40)  # D = 40 > N = 12


def test_adapter_experts_dropout():
    torch.manual_seed(0)
    N, D, p, seed = 20, 100, 0.3, 1234
    # Recover the dropout mask: with identity adapters, one expert, weight 1 and y > 0,
    # out - y = GELU(dropout(y)) is zero exactly where an element was dropped.
    y_pos = torch.rand(N, D) + 0.5
    eye = torch.eye(D)[None]
    out = kernels.adapter_experts(y_pos, torch.ones(N, 1), torch.zeros(N, 1, dtype=torch.long), eye, eye,
                                  1.0, dropout_p=p, training=True, seed=seed)
    keep = (out - y_pos) > 0
    # the kept fraction is 1 - p within 5 binomial standard deviations
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / (N * D)) ** 0.5

    # The real adapters with the same seed (the mask depends only on seed, token and column)
    # equal the reference fed that mask, forward and backward; the mask is shared by both slots.
    y = randn(N, D)
    weights, experts = routing(N, 4, 2, torch.float32)
    down, up = adapters(4, D, 24, torch.float32)
    inputs = (y, weights, experts, down, up)

    def reference(y, weights, experts, down, up, scaling):
        # the loop on the dropped-out input yd adds the adapters to yd; the layer adds them to y
        yd = y * keep / (1 - p)
        return y + (adapter_experts_loop(yd, weights, experts, down, up, scaling) - yd)

    def kernel(*args):
        return kernels.adapter_experts(*args, dropout_p=p, training=True, seed=seed)
    check(kernel, reference, inputs, 0.25, reduction=D)

    # same seed, same result; another seed, another mask
    again = kernels.adapter_experts(*inputs, 0.25, dropout_p=p, training=True, seed=seed)
    other = kernels.adapter_experts(*inputs, 0.25, dropout_p=p, training=True, seed=seed + 1)
    assert torch.equal(again, kernel(*inputs, 0.25)) and not torch.equal(again, other)
    # without a seed, one is drawn from torch's generator: reproducible under torch.manual_seed
    drawn = []
    for _ in range(2):
        torch.manual_seed(7)
        drawn.append(kernels.adapter_experts(*inputs, 0.25, dropout_p=p, training=True))
    assert torch.equal(*drawn)


def test_adapter_experts_rejects_bad_shapes():
    y = torch.zeros(3, 8)
    w, e = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="expected"):
        kernels.adapter_experts(y, w, e, torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.adapter_experts(y, w, e, torch.zeros(2, 4, 8), torch.zeros(2, 8, 4), 1.0, dropout_p=1.0)
