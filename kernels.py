"""Triton kernels for pesc: the fast twins of plain PyTorch math in model.py and moe.py.

Each kernel is a torch.autograd.Function with its own backward; model.py and moe.py keep the
readable PyTorch version and call the function here only when `use_triton(x)` says so
(PESC_KERNELS=auto|triton|torch). All math accumulates in fp32; 16-bit inputs are upcast right
after loading (Triton's CPU interpreter computes bf16 arithmetic wrongly, and fp32 accumulation
is what the GPU wants anyway). On a GPU the matmuls keep 16-bit operands on the tensor cores;
fp32 inputs, and every dot under the interpreter, use exact IEEE fp32 dots.

    rms_norm              RMSNorm, optionally fused with the residual add
    swiglu                silu(a) * b
    apply_rope            rotary embedding, "halves" (Hugging Face) layout
    linear_cross_entropy  LM head + cross-entropy, chunked over tokens, no (N, V) fp32 logits
    adapter_experts       the PESC adapter experts: sort by expert, grouped GEMMs, combine
    nf4_dequantize        NF4 (QLoRA format, double-quantized absmaxes) -> compute-dtype weight

Their references, which tests/test_kernels.py holds them equal to, are the code the model runs
without them: model.rms_norm_torch, model.swiglu_torch, model.apply_rope_torch, model.cross_entropy
after the LM head, moe.adapter_experts_loop, and quant.dequantize_torch.
"""
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels.py must import without Triton; use_triton() is then False
    triton = None
    tl = SimpleNamespace(constexpr=None)  # the kernel signatures below mention tl.constexpr

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. now: kernels run on CPU tensors only then.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


MODES = ("auto", "triton", "torch")


def mode() -> str:
    """PESC_KERNELS (auto, triton or torch; default auto): the one place it is read. Read at each
    call, so that a test or a benchmark may set it between calls."""
    m = os.environ.get("PESC_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"PESC_KERNELS={m!r}: expected one of {', '.join(MODES)}")
    return m


def use_triton(x: torch.Tensor) -> bool:
    """Whether to run x through the Triton kernels: auto (CUDA + Triton) | triton | torch."""
    m = mode()
    if m == "auto":
        return x.is_cuda and triton is not None
    if m == "torch":
        return False
    if triton is None:
        raise RuntimeError("PESC_KERNELS=triton but Triton is not installed (pip install triton)")
    if not x.is_cuda and not _INTERPRET:
        raise RuntimeError("PESC_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 "
                           "set before kernels.py is imported")
    return True


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2(n):
    """The smallest power of two >= n (block sizes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _num_warps(block_elems):
    return 4 if block_elems <= 2048 else 8 if block_elems <= 8192 else 16


# -----------------------------------------------------------------------------------------------
# RMSNorm (+ fused residual add)

@_jit
def _rms_norm_fwd(x_ptr, r_ptr, w_ptr, h_ptr, out_ptr, rstd_ptr, M, D, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h_q = (h + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h_q, mask=mask)
        h = h_q.to(tl.float32)  # the twin normalises the sum as rounded to h's dtype
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)  # (BLOCK_M,)
    n = (h * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (n * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@_jit
def _rms_norm_bwd(dout_ptr, dh_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, D,
                  HAS_DH: tl.constexpr, WEIGHT_GRAD: tl.constexpr, X_DTYPE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Persistent: a few programs stride over all rows, so the weight gradient is summed in
    # registers and only (programs, D) partial sums reach memory; no atomics, deterministic.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dn = g * w[None, :]
        # d/dh of h * rsqrt(mean(h^2) + eps), with n = h * rstd
        dh = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        if HAS_DH:  # the caller also used h (the residual stream)
            dh += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:  # the twin multiplies the weight by n rounded to x's dtype
            dw += tl.sum(g * n.to(X_DTYPE).to(tl.float32), axis=0)
    if WEIGHT_GRAD:
        tl.store(dw_part_ptr + pid * D + cols, dw, mask=cols < D)


# torch dtype -> Triton dtype, for the constexpr that tells the backward kernel x's dtype
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64} if triton else {}


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still more than one program, so the partial-sum path is exercised


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        D = x.shape[-1]
        M = x.numel() // D
        x = x.contiguous()  # the kernels treat (..., D) as (M, D)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        h = x
        if residual is not None:
            residual = residual.contiguous()
            # Under autocast a layer's bf16 output x meets an fp32 residual stream (trainable
            # embeddings): h = x + residual then has the promoted dtype, as in the twin.
            h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        BLOCK_D = _pow2(D)
        BLOCK_M = max(1, min(64, 4096 // BLOCK_D))  # ~4K elements per program
        _rms_norm_fwd[(_cdiv(M, BLOCK_M),)](
            x, residual, weight, h, out, rstd, M=M, D=D, eps=eps, HAS_RESIDUAL=residual is not None,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=_num_warps(BLOCK_M * BLOCK_D))
        ctx.save_for_backward(h, weight, rstd)
        ctx.blocks, ctx.dtypes = (BLOCK_M, BLOCK_D), (x.dtype, residual.dtype if residual is not None else None)
        ctx.set_materialize_grads(False)  # dout or dh is None when that output was not used
        return out if residual is None else (out, h)

    @staticmethod
    def backward(ctx, dout, dh=None):
        h, weight, rstd = ctx.saved_tensors
        D = h.shape[-1]
        M = h.numel() // D
        BLOCK_M, BLOCK_D = ctx.blocks
        x_dtype, r_dtype = ctx.dtypes
        dout = torch.zeros_like(h) if dout is None else dout.contiguous()
        dh = dh.contiguous() if dh is not None else None
        weight_grad = ctx.needs_input_grad[1]
        programs = min(_cdiv(M, BLOCK_M), _num_sms(h.device))
        dx = torch.empty_like(h)
        dw_part = torch.empty(programs, D, dtype=torch.float32, device=h.device) if weight_grad else None
        _rms_norm_bwd[(programs,)](
            dout, dh, h, weight, rstd, dx, dw_part, M=M, D=D, HAS_DH=dh is not None,
            WEIGHT_GRAD=weight_grad, X_DTYPE=_TL_DTYPES[x_dtype], BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_M * BLOCK_D))
        dweight = dw_part.sum(0).to(weight.dtype) if weight_grad else None
        # h = x + residual, so both get the same gradient (autograd copies before accumulating),
        # each in its own dtype (dx is in h's, the wider of the two)
        return dx.to(x_dtype), dweight, None, dx.to(r_dtype) if r_dtype is not None else None


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last dim of x (..., D); with residual, also returns h = x + residual."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be ({x.shape[-1]},)")
    return _RMSNorm.apply(x, weight, float(eps), residual)


# -----------------------------------------------------------------------------------------------
# SwiGLU: silu(a) * b

@_jit
def _swiglu_fwd(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd(a_ptr, b_ptr, dout_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(da_ptr + offs, (g * b * sig * (1.0 + a * (1.0 - sig))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, (g * a * sig).to(db_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        out = torch.empty_like(a)
        _swiglu_fwd[(_cdiv(a.numel(), _SWIGLU_BLOCK),)](a, b, out, n=a.numel(), BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da, db = torch.empty_like(a), torch.empty_like(b)
        _swiglu_bwd[(_cdiv(a.numel(), _SWIGLU_BLOCK),)](
            a, b, dout.contiguous(), da, db, n=a.numel(), BLOCK=_SWIGLU_BLOCK)
        return da, db


def swiglu(a, b):
    """silu(a) * b, elementwise; a and b have the same shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must match")
    return _SwiGLU.apply(a, b)


# -----------------------------------------------------------------------------------------------
# Rotary embedding, "halves" layout: x1 = x[..., :hd/2], x2 = x[..., hd/2:]

@_jit
def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, HALF,
          sx_b, sx_t, sx_h, sx_d, sc_b, sc_t,
          BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per (b, t): all heads of one position share one row of cos/sin.
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < H) & (d[None, :] < HALF)
    cos = tl.load(cos_ptr + b * sc_b + t * sc_t + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + b * sc_b + t * sc_t + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # the transpose of a rotation is the rotation by the opposite angle
        sin = -sin
    x = x_ptr + b * sx_b + t * sx_t + heads[:, None] * sx_h
    x1 = tl.load(x + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + (d[None, :] + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + pid * H * 2 * HALF + heads[:, None] * 2 * HALF + d[None, :]  # contiguous (B, T, H, hd)
    tl.store(out, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _rope_launch(x, cos, sin, backward):
    B, T, H, hd = x.shape
    out = torch.empty(B, T, H, hd, dtype=x.dtype, device=x.device)
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0  # batch 1 broadcasts over B
    BLOCK_H, BLOCK_HALF = _pow2(H), _pow2(hd // 2)
    sx_b, sx_t, sx_h, sx_d = x.stride()
    _rope[(B * T,)](x, cos, sin, out, T=T, H=H, HALF=hd // 2, sx_b=sx_b, sx_t=sx_t, sx_h=sx_h, sx_d=sx_d,
                    sc_b=sc_b, sc_t=cos.stride(1), BACKWARD=backward, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
                    num_warps=_num_warps(BLOCK_H * BLOCK_HALF))
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dout, cos, sin, backward=True), None, None


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, hd), any strides, by cos/sin (B or 1, T, hd/2) fp32; returns a contiguous tensor."""
    B, T, H, hd = x.shape
    if hd % 2 or cos.shape != sin.shape or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, hd // 2):
        raise ValueError(f"apply_rope: x {tuple(x.shape)} needs an even head dim and cos/sin of shape "
                         f"(1 or {B}, {T}, {hd // 2}); got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    # cos and sin share one set of strides; the last dim must be dense
    cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPE.apply(x, cos, sin)


# -----------------------------------------------------------------------------------------------
# Fused LM head + cross-entropy

@_jit
def _cross_entropy(logits_ptr, targets_ptr, loss_ptr, n_valid_ptr, V, ignore_index,
                   WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row: an online log-sum-exp over V, then (for training) the gradient
    # (softmax - onehot) / n_valid written over the logits, which are not needed afterwards.
    row = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + row * V
    target = tl.load(targets_ptr + row)
    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(logit - m)
    target_logit = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        target_logit += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    lse = m + tl.log(s)
    valid = target != ignore_index
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WITH_GRAD:
        scale = tl.where(valid, 1.0 / tl.load(n_valid_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            # exp(x - m) / s, not exp(x - lse): lse's rounding would shift every probability the
            # same way, and that error adds up coherently in d h = d logits @ W
            grad = (tl.exp(x - m) / s - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(logits + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, grad_h, grad_weight):
        N, D = h.shape
        V = weight.shape[0]
        n_valid = (targets != ignore_index).sum().clamp(min=1).float()  # stays on the device: no sync
        loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
        dh = torch.empty(N, D, dtype=h.dtype, device=h.device) if grad_h else None
        dweight = torch.zeros(V, D, dtype=torch.float32, device=h.device) if grad_weight else None
        # Chunks of rows whose logits take about as much memory as h itself.
        chunk = min(N, _pow2(_cdiv(N, _cdiv(V, D))))
        logits_buf = torch.empty(chunk, V, dtype=h.dtype, device=h.device)
        BLOCK_V = min(_pow2(V), 4096)
        for start in range(0, N, chunk):
            hc = h[start:start + chunk]
            logits = torch.mm(hc, weight.t(), out=logits_buf[:hc.shape[0]])  # (C, V)
            _cross_entropy[(hc.shape[0],)](
                logits, targets[start:start + chunk], loss_rows[start:start + chunk], n_valid, V=V,
                ignore_index=ignore_index, WITH_GRAD=grad_h or grad_weight, BLOCK_V=BLOCK_V,
                num_warps=_num_warps(BLOCK_V))
            # logits now holds d loss / d logits
            if grad_h:
                torch.mm(logits, weight, out=dh[start:start + chunk])
            if grad_weight:
                dweight.add_(logits.t() @ hc)  # each chunk's product is in h's dtype; the running sum is fp32
        ctx.save_for_backward(dh, dweight)
        ctx.weight_dtype = weight.dtype
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dweight = ctx.saved_tensors
        dh = dh * grad_loss if dh is not None else None
        dweight = (dweight * grad_loss).to(ctx.weight_dtype) if dweight is not None else None
        return dh, dweight, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=-100):
    """Mean cross-entropy of h (N, D) @ weight (V, D).T against targets (N,), skipping ignore_index.

    Targets other than ignore_index must lie in [0, V). Returns an fp32 scalar; the gradients
    are computed in this forward pass, chunk by chunk, and only scaled in backward.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}: expected (N, D), (V, D), (N,)")
    if torch.is_autocast_enabled(h.device.type):  # as F.linear would; the matmuls inside write
        dt = torch.get_autocast_dtype(h.device.type)  # into buffers, which autocast does not reach
        h, weight = h.to(dt), weight.to(dt)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, targets.contiguous(), int(ignore_index),
                                     grad and h.requires_grad, grad and weight.requires_grad)


# -----------------------------------------------------------------------------------------------
# PESC adapter experts: out = y + sum_j w_j * s * U_e(GELU(D_e(dropout(y)))), e = experts[:, j]
#
# The N*k (token, slot) pairs are sorted by expert; the expert-sorted rows are cut into blocks of
# BLOCK_M rows that never straddle two experts, so every block runs one expert's dense matmul
# (a grouped GEMM). Per-(token, slot) results are written unsorted and summed over the k slots
# by a second kernel: deterministic, no atomics. Shorthand below: M = N*k, R = adapter dim r,
# "sorted row i" = the i-th (token, slot) pair in expert order, order[i] its flat index t*k + j.

@_jit
def _dot(a, b, acc, EXACT: tl.constexpr):
    # EXACT: fp32 operands, IEEE fp32 dot (fp32 inputs; and the interpreter, whose 16-bit dots are
    # wrong). Otherwise a and b are 16-bit and run on the tensor cores, accumulating in fp32.
    if EXACT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@_jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@_jit
def _gelu_grad(z):
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@_jit
def _dropout_keep(offs, seed, p):
    # The mask is a function of (seed, token * D + column) only: every expert, slot and the
    # backward pass regenerate the same one, so it is never stored.
    return tl.rand(seed, offs) >= p


@_jit
def _load_adapter_input(y_ptr, tok, cols, row_mask, D, seed, p, DROPOUT: tl.constexpr):
    """dropout(y)[tok, cols] as fp32, (BLOCK_M, BLOCK) for tok (BLOCK_M,), cols (BLOCK,)."""
    offs = tok[:, None] * D + cols[None, :]
    x = tl.load(y_ptr + offs, mask=row_mask[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
    if DROPOUT:
        x = tl.where(_dropout_keep(offs, seed, p), x / (1.0 - p), 0.0)
    return x


@_jit
def _adapter_down(y_ptr, down_ptr, z_ptr, order_ptr, block_expert_ptr, block_row_ptr,
                  expert_end_ptr, E, D, R, K, seed, p,
                  DROPOUT: tl.constexpr, EXACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # z[i] = dropout(y)[token of i] @ down[e].T: (BLOCK_M, BLOCK_R) tile of z (M, R)
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e >= E:  # a spare block: the grid is sized for the worst case without a host sync
        return
    rows = tl.load(block_row_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_end_ptr + e)
    tok = tl.load(order_ptr + rows, mask=row_mask, other=0) // K
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _load_adapter_input(y_ptr, tok, kk, row_mask, D, seed, p, DROPOUT).to(y_ptr.dtype.element_ty)
        b = tl.load(down_ptr + e * R * D + rr[None, :] * D + kk[:, None],  # down[e].T tile (BLOCK_K, BLOCK_R)
                    mask=(kk[:, None] < D) & (rr[None, :] < R), other=0.0)
        acc = _dot(a, b, acc, EXACT)
    # z is stored in y's dtype: the twin rounds the down-projection there too
    tl.store(z_ptr + rows[:, None] * R + rr[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (rr[None, :] < R))


@_jit
def _adapter_rows_out(a_ptr, mat_ptr, out_ptr, order_ptr, weights_ptr, block_expert_ptr,
                      block_row_ptr, expert_end_ptr, E, D, R, scaling, s_e, s_n, s_k,
                      GELU: tl.constexpr, EXACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[order[i]] = act(a[i]) @ mat[e] (R -> D), stored unsorted as fp32 (M, D). Two uses:
    #   forward:  a = z,  act = GELU, mat[e][k, n] = up[e, n, k],  times scaling * weight
    #   backward: a = dz, act = id,   mat[e][k, n] = down[e, k, n]
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e >= E:
        return
    rows = tl.load(block_row_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_end_ptr + e)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * R + kk[None, :],
                    mask=row_mask[:, None] & (kk[None, :] < R), other=0.0).to(tl.float32)
        if GELU:
            a = _gelu(a)
        b = tl.load(mat_ptr + e * s_e + kk[:, None] * s_k + nn[None, :] * s_n,
                    mask=(kk[:, None] < R) & (nn[None, :] < D), other=0.0)
        acc = _dot(a.to(mat_ptr.dtype.element_ty), b, acc, EXACT)
    flat = tl.load(order_ptr + rows, mask=row_mask, other=0)
    if GELU:
        acc *= scaling * tl.load(weights_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + flat[:, None] * D + nn[None, :], acc, mask=row_mask[:, None] & (nn[None, :] < D))


@_jit
def _adapter_combine(base_ptr, rows_ptr, out_ptr, N, D, K, seed, p, DROPOUT: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[t] = base[t] + sum_j rows[t*K + j]; in backward the sum also goes back through dropout
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (tok[:, None] < N) & (cols[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        acc += tl.load(rows_ptr + (tok[:, None] * K + j) * D + cols[None, :], mask=mask, other=0.0)
    offs = tok[:, None] * D + cols[None, :]
    if DROPOUT:
        acc = tl.where(_dropout_keep(offs, seed, p), acc / (1.0 - p), 0.0)
    acc += tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _adapter_dz(dout_ptr, up_ptr, z_ptr, weights_ptr, dz_ptr, dw_part_ptr, order_ptr,
                block_expert_ptr, block_row_ptr, expert_end_ptr, E, M, D, R, K, scaling,
                EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # v = dout[token] @ up[e] (BLOCK_M, BLOCK_R). Then, with g = GELU(z):
    #   d weight[order[i]] = s * <v, g>   (summed over the R tiles by the caller)
    #   dz = s * weight * v * GELU'(z)
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e >= E:
        return
    rows = tl.load(block_row_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_end_ptr + e)
    flat = tl.load(order_ptr + rows, mask=row_mask, other=0)
    tok = flat // K
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(dout_ptr + tok[:, None] * D + kk[None, :],
                    mask=row_mask[:, None] & (kk[None, :] < D), other=0.0)
        b = tl.load(up_ptr + e * D * R + kk[:, None] * R + rr[None, :],
                    mask=(kk[:, None] < D) & (rr[None, :] < R), other=0.0)
        acc = _dot(a.to(up_ptr.dtype.element_ty), b, acc, EXACT)
    tile_mask = row_mask[:, None] & (rr[None, :] < R)
    z = tl.load(z_ptr + rows[:, None] * R + rr[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    g = _gelu(z).to(z_ptr.dtype.element_ty).to(tl.float32)  # as the forward's up-projection saw it
    tl.store(dw_part_ptr + tl.program_id(1).to(tl.int64) * M + flat, scaling * tl.sum(acc * g, axis=1),
             mask=row_mask)
    w = tl.load(weights_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
    dz = (scaling * w)[:, None] * acc * _gelu_grad(z)
    tl.store(dz_ptr + rows[:, None] * R + rr[None, :], dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)


@_jit
def _adapter_dup(dout_ptr, z_ptr, weights_ptr, dup_ptr, order_ptr, expert_start_ptr,
                 expert_end_ptr, D, R, K, scaling, EXACT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # d up[e] (D, R) = sum over expert e's rows of (s * w * dout[token]).T @ GELU(z); one program
    # per (e, D tile, R tile) loops over those rows: a reduction without atomics.
    e = tl.program_id(0).to(tl.int64)  # int64: e * D * R passes int32 once E * D * r > 2**31
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    for m0 in range(tl.load(expert_start_ptr + e), tl.load(expert_end_ptr + e), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.load(expert_end_ptr + e)
        flat = tl.load(order_ptr + rows, mask=row_mask, other=0)
        sw = scaling * tl.load(weights_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
        a = tl.load(dout_ptr + (flat // K)[:, None] * D + dd[None, :],
                    mask=row_mask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * R + rr[None, :],
                    mask=row_mask[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        a = (a * sw[:, None]).to(dup_ptr.dtype.element_ty)
        acc = _dot(tl.trans(a), _gelu(z).to(dup_ptr.dtype.element_ty), acc, EXACT)
    tl.store(dup_ptr + e * D * R + dd[:, None] * R + rr[None, :], acc.to(dup_ptr.dtype.element_ty),
             mask=(dd[:, None] < D) & (rr[None, :] < R))


@_jit
def _adapter_ddown(dz_ptr, y_ptr, ddown_ptr, order_ptr, expert_start_ptr, expert_end_ptr,
                   D, R, K, seed, p, DROPOUT: tl.constexpr, EXACT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # d down[e] (R, D) = sum over expert e's rows of dz.T @ dropout(y)[token]
    e = tl.program_id(0).to(tl.int64)  # as in _adapter_dup: e * R * D in int64
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(tl.load(expert_start_ptr + e), tl.load(expert_end_ptr + e), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.load(expert_end_ptr + e)
        tok = tl.load(order_ptr + rows, mask=row_mask, other=0) // K
        dz = tl.load(dz_ptr + rows[:, None] * R + rr[None, :],
                     mask=row_mask[:, None] & (rr[None, :] < R), other=0.0)
        yd = _load_adapter_input(y_ptr, tok, dd, row_mask, D, seed, p, DROPOUT)
        acc = _dot(tl.trans(dz), yd.to(ddown_ptr.dtype.element_ty), acc, EXACT)
    tl.store(ddown_ptr + e * R * D + rr[:, None] * D + dd[None, :], acc.to(ddown_ptr.dtype.element_ty),
             mask=(rr[:, None] < R) & (dd[None, :] < D))


def _route(experts, num_experts, BLOCK_M):
    """Sort the (token, slot) pairs by expert and cut them into single-expert blocks, all on the device.

    Returns order (M,) flat index t*k + j of each sorted row, expert_start/end (E,) its sorted
    rows, and per block of the grid its expert (num_experts marks a spare block) and first row.
    """
    M = experts.numel()
    sorted_experts, order = torch.sort(experts.reshape(-1), stable=True)  # (M,)
    ids = torch.arange(num_experts, device=experts.device, dtype=sorted_experts.dtype)
    expert_start = torch.searchsorted(sorted_experts, ids)  # (E,)
    expert_end = torch.searchsorted(sorted_experts, ids, right=True)  # (E,)
    n_blocks = (expert_end - expert_start + BLOCK_M - 1) // BLOCK_M  # (E,)
    block_end = n_blocks.cumsum(0)
    # sum(n_blocks) <= M / BLOCK_M + E: size the grid for that bound instead of reading it back
    blocks = torch.arange(_cdiv(M, BLOCK_M) + num_experts, device=experts.device)
    block_expert = torch.searchsorted(block_end, blocks, right=True)
    e = block_expert.clamp(max=num_experts - 1)
    block_row = expert_start[e] + (blocks - block_end[e] + n_blocks[e]) * BLOCK_M
    return order, expert_start, expert_end, block_expert, block_row


def _adapter_combine_launch(base, rows, out, K, seed, p, dropout):
    N, D = base.shape
    BLOCK_T, BLOCK_D = 16, min(128, _pow2(D))
    _adapter_combine[(_cdiv(N, BLOCK_T), _cdiv(D, BLOCK_D))](
        base, rows, out, N=N, D=D, K=K, seed=seed, p=p, DROPOUT=dropout, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)


class _AdapterExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, experts, down, up, scaling, p, seed):
        N, D = y.shape
        E, R, _ = down.shape
        K = experts.shape[1]
        M = N * K
        # Tiles: BLOCK_M sorted rows; R and D in tiles of at most 64 (>= 16, the tl.dot minimum).
        # Big row tiles only when experts get many rows on average (training batches).
        BLOCK_M = 64 if M >= 256 * E else 16
        BLOCK_R, BLOCK_D = min(64, max(16, _pow2(R))), min(64, max(16, _pow2(D)))
        exact = y.dtype == torch.float32 or not y.is_cuda
        order, expert_start, expert_end, block_expert, block_row = _route(experts, E, BLOCK_M)
        grid_m = block_expert.shape[0]

        z = torch.empty(M, R, dtype=y.dtype, device=y.device)  # pre-GELU activations, sorted rows
        _adapter_down[(grid_m, _cdiv(R, BLOCK_R))](
            y, down, z, order, block_expert, block_row, expert_end, E=E, D=D, R=R, K=K, seed=seed, p=p,
            DROPOUT=p > 0, EXACT=exact, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_D)
        rows = torch.empty(M, D, dtype=torch.float32, device=y.device)  # s * w * A_e(y), per (token, slot)
        _adapter_rows_out[(grid_m, _cdiv(D, BLOCK_D))](
            z, up, rows, order, weights, block_expert, block_row, expert_end, E=E, D=D, R=R, scaling=scaling,
            s_e=D * R, s_n=R, s_k=1, GELU=True, EXACT=exact, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_D, BLOCK_K=BLOCK_R)
        out = torch.empty_like(y)
        _adapter_combine_launch(y, rows, out, K, seed, p, dropout=False)

        ctx.save_for_backward(y, weights, down, up, z, order, expert_start, expert_end, block_expert, block_row)
        ctx.args = (scaling, p, seed, exact, BLOCK_M, BLOCK_R, BLOCK_D)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, weights, down, up, z, order, expert_start, expert_end, block_expert, block_row = ctx.saved_tensors
        scaling, p, seed, exact, BLOCK_M, BLOCK_R, BLOCK_D = ctx.args
        need_y, need_weights, _, need_down, need_up = ctx.needs_input_grad[:5]
        N, D = y.shape
        E, R, _ = down.shape
        M, K = z.shape[0], weights.shape[1]
        grid_m = block_expert.shape[0]
        dout = dout.contiguous()
        dy = dweights = ddown = dup = None

        if need_y or need_weights or need_down:
            dz = torch.empty_like(z)
            dw_part = torch.empty(_cdiv(R, BLOCK_R), M, dtype=torch.float32, device=y.device)
            _adapter_dz[(grid_m, _cdiv(R, BLOCK_R))](
                dout, up, z, weights, dz, dw_part, order, block_expert, block_row, expert_end,
                E=E, M=M, D=D, R=R, K=K, scaling=scaling, EXACT=exact, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_D)
            if need_weights:
                dweights = dw_part.sum(0).view(N, K).to(weights.dtype)
        if need_y:  # dy = dout + dropout'(sum_j dz @ down[e])
            rows = torch.empty(M, D, dtype=torch.float32, device=y.device)
            _adapter_rows_out[(grid_m, _cdiv(D, BLOCK_D))](
                dz, down, rows, order, weights, block_expert, block_row, expert_end, E=E, D=D, R=R,
                scaling=scaling, s_e=R * D, s_n=1, s_k=D, GELU=False, EXACT=exact, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_D, BLOCK_K=BLOCK_R)
            dy = torch.empty_like(y)
            _adapter_combine_launch(dout, rows, dy, K, seed, p, dropout=p > 0)
        if need_down:
            ddown = torch.empty_like(down)
            _adapter_ddown[(E, _cdiv(R, BLOCK_R), _cdiv(D, BLOCK_D))](
                dz, y, ddown, order, expert_start, expert_end, D=D, R=R, K=K, seed=seed, p=p, DROPOUT=p > 0,
                EXACT=exact, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
        if need_up:
            dup = torch.empty_like(up)
            _adapter_dup[(E, _cdiv(D, BLOCK_D), _cdiv(R, BLOCK_R))](
                dout, z, weights, dup, order, expert_start, expert_end, D=D, R=R, K=K, scaling=scaling,
                EXACT=exact, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
        return dy, dweights, None, ddown, dup, None, None, None


def adapter_experts(y, weights, experts, down, up, scaling, dropout_p=0.0, training=False, seed=None):
    """y + sum_j weights[:, j] * scaling * up[e](GELU(down[e](dropout(y)))), e = experts[:, j].

    y (N, D) the frozen FFN's output; weights (N, k) routing weights; experts (N, k) int ids in
    [0, E); down (E, r, D), up (E, D, r). Dropout (training and dropout_p > 0) draws its mask
    from `seed` (drawn from torch's CPU generator when None), never from torch's dropout.
    """
    N, D = y.shape
    E, R = down.shape[:2]
    if (weights.shape != experts.shape or weights.shape[0] != N or down.shape != (E, R, D)
            or up.shape != (E, D, R)):
        raise ValueError(f"adapter_experts: y {tuple(y.shape)}, weights {tuple(weights.shape)}, experts "
                         f"{tuple(experts.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}: expected "
                         f"(N, D), (N, k), (N, k), (E, r, D), (E, D, r)")
    if down.dtype != y.dtype or up.dtype != y.dtype:
        raise ValueError(f"adapter_experts: down {down.dtype} and up {up.dtype} must have y's dtype {y.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"adapter_experts: dropout_p={dropout_p} must be in [0, 1)")
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())  # CPU generator: no device sync
    return _AdapterExperts.apply(y.contiguous(), weights.contiguous(), experts.contiguous(), down.contiguous(),
                                 up.contiguous(), float(scaling), p, int(seed or 0))


# -----------------------------------------------------------------------------------------------
# NF4 dequantization (the format is written down in quant.py; the tables come in as tensors)

@_jit
def _nf4_dequantize(codes_ptr, absmax_ptr, scale_ptr, offset_ptr, levels_ptr, map_ptr, out_ptr,
                    n, n_bytes, n_blocks, HALF: tl.constexpr, BLOCKS: tl.constexpr,
                    ABSMAX_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    # One program: BLOCKS quantization blocks of HALF bytes (2 * HALF weights) each.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    block_mask = blocks < n_blocks
    if DOUBLE_QUANT:  # absmax = map[code] * scale + offset, in fp32
        a_code = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + blocks // ABSMAX_BLOCK, mask=block_mask, other=0.0)
        absmax = tl.load(map_ptr + a_code, mask=block_mask, other=0.0) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0)
    byte = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BLOCKS, HALF)
    packed = tl.load(codes_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    hi = tl.load(levels_ptr + (packed >> 4)) * absmax[:, None]  # element 2 * byte
    lo = tl.load(levels_ptr + (packed & 15)) * absmax[:, None]  # element 2 * byte + 1
    tl.store(out_ptr + 2 * byte, hi.to(out_ptr.dtype.element_ty), mask=2 * byte < n)
    tl.store(out_ptr + 2 * byte + 1, lo.to(out_ptr.dtype.element_ty), mask=2 * byte + 1 < n)


def nf4_dequantize(codes, absmax, absmax_scale, absmax_offset, levels, dyn_map, shape, blocksize, dtype,
                   absmax_blocksize=256):
    """The weight of `shape` in `dtype` from its NF4 codes and absmaxes (uint8 double-quantized
    codes with their fp32 scales and offset, or fp32 absmaxes), one pass.

    levels (16,) and dyn_map (256,) are the format's fp32 tables (quant.NF4_LEVELS, DYNAMIC_MAP)."""
    n = 1
    for s in shape:
        n *= s
    n_blocks = absmax.numel()
    if codes.dtype != torch.uint8 or codes.numel() != (n + 1) // 2 or n_blocks != _cdiv(n, blocksize):
        raise ValueError(f"nf4_dequantize: {codes.numel()} {codes.dtype} codes and {n_blocks} absmaxes "
                         f"do not hold a {tuple(shape)} weight in blocks of {blocksize}")
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    half = blocksize // 2
    BLOCKS = max(1, min(_pow2(n_blocks), 4096 // half))  # 4 KB of codes per program
    _nf4_dequantize[(_cdiv(n_blocks, BLOCKS),)](
        codes, absmax, absmax_scale, absmax_offset, levels, dyn_map, out, n, codes.numel(), n_blocks,
        HALF=half, BLOCKS=BLOCKS, ABSMAX_BLOCK=absmax_blocksize, DOUBLE_QUANT=absmax.dtype == torch.uint8,
        num_warps=_num_warps(BLOCKS * half))
    return out
