"""
PESC: Parameter-Efficient Sparsity Crafting (Wu, Zheng, Yu 2024, arXiv 2401.02731), in plain PyTorch.

Every dense SwiGLU FFN stays, frozen, and is computed once per token: y = W2(silu(W1 x) * W3 x).
A router reads the FFN input x, picks the top-k of E experts (softmax over the k chosen logits),
and each chosen expert adds a small bottleneck adapter of y:

    out = y + sum_j w_j * s * U_{e_j}( GELU( D_{e_j}( dropout(y) ) ) )

Upcycling sets every U_e to zero, so the PESC model starts as exactly the dense model. Only the
routers and adapters (and optional LoRA on the base linears) are trained. The load-balancing
loss is the Switch Transformer one (not the constant that the official code computes).

The PESC settings have one home, the model's `config.moe`: a PESC layer is built from it and
receives it with every call, so changing a training knob (dropout, loss weights) cannot leave a
stale copy behind. LoRA on the base linears is described by `config.lora` alone (None: none).
`make_trainable` builds the model a training mode trains; `set_trainable` alone decides which
tensors train in each mode.

This module never imports model.py: `upcycle` works on the model instance it is given.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import quant


@dataclass
class PESCConfig:
    num_experts: int = 8
    top_k: int = 2  # experts per token
    adapter_dim: int = 512
    adapter_scaling: float = 0.25  # s, "moe_scaling" in the official configs
    adapter_dropout: float = 0.1  # on the adapter input (0.1 Camelidae, 0 sparsetral)
    aux_loss_coef: float = 0.01  # load balancing (Switch Transformer), 1.0 at perfect balance
    z_loss_coef: float = 0.0  # ST-MoE router z-loss, off by default

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in PESC_PRESETS:
            raise ValueError(f"unknown PESC preset {name!r}; known: {', '.join(PESC_PRESETS)}")
        return cls(**{**PESC_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        return _from_dict(cls, d, source, "moe")

    def to_dict(self) -> dict:
        return asdict(self)


PESC_PRESETS = {
    "camelidae-8x7b": dict(num_experts=8, top_k=2, adapter_dim=512, adapter_scaling=0.25, adapter_dropout=0.1),
    "camelidae-8x13b": dict(num_experts=8, top_k=2, adapter_dim=512, adapter_scaling=0.25, adapter_dropout=0.1),
    "camelidae-8x34b": dict(num_experts=8, top_k=2, adapter_dim=512, adapter_scaling=0.25, adapter_dropout=0.1),
    "qwen2idae-16x14b": dict(num_experts=16, top_k=4, adapter_dim=512, adapter_scaling=0.25, adapter_dropout=0.1),
    "sparsetral-16x7b": dict(num_experts=16, top_k=4, adapter_dim=512, adapter_scaling=1.0, adapter_dropout=0.0),
}


@dataclass
class LoRAConfig:
    """LoRA on the base linears: base(x) + (alpha / rank) B A dropout(x). The defaults are the
    official recipe's (QLoRA r=64, alpha 16, dropout 0.1 on all seven linears)."""
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank} must be at least 1 (no LoRA: no LoRAConfig)")
        unknown = set(self.targets) - set(LINEARS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; known: {list(LINEARS)}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        return _from_dict(cls, d, source, "lora")

    def to_dict(self) -> dict:
        return asdict(self)


def _from_dict(cls, d, source, what):
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown {what} config key(s) {unknown}")
    return cls(**d)


# The seven base linears of a block, by the paper's name: (attribute in model.py's Attention or
# FeedForward, Hugging Face's module in a layer). LoRA targets, NF4 quantization and every
# checkpoint layout (HF, PEFT) name them from this table.
LINEARS = {"q": ("wq", "self_attn.q_proj"), "k": ("wk", "self_attn.k_proj"), "v": ("wv", "self_attn.v_proj"),
           "o": ("wo", "self_attn.o_proj"), "gate": ("w1", "mlp.gate_proj"), "up": ("w3", "mlp.up_proj"),
           "down": ("w2", "mlp.down_proj")}

# -----------------------------------------------------------------------------
# Routing and the adapter experts


def route(logits, top_k: int):
    """Top-k of the raw router logits, softmax over those k. logits: (N, E) -> (N, k) each.

    Equal to a softmax over all E followed by renormalising the chosen k."""
    top_logits, experts = logits.topk(top_k, dim=-1)
    weights = F.softmax(top_logits.float(), dim=-1)
    return weights, experts


def adapter_experts_loop(y, weights, experts, down, up, scaling, dropout_p=0.0, training=False):
    """Reference: the official algorithm, one boolean mask per expert. The sorted, grouped-GEMM
    and Triton paths are all tested against this one.

    y: (N, D) FFN output; weights, experts: (N, k); down: (E, r, D); up: (E, D, r)."""
    N, k = experts.shape
    E = down.shape[0]
    yd = F.dropout(y, dropout_p, training) if dropout_p > 0 else y
    y_rep = yd.repeat_interleave(k, dim=0)  # one copy per (token, slot)
    flat = experts.reshape(-1)
    a = torch.zeros_like(y_rep)
    for e in range(E):
        sel = flat == e
        a[sel] = scaling * (F.gelu(y_rep[sel] @ down[e].T) @ up[e].T)
    return y + (a.view(N, k, -1) * weights[..., None].to(y.dtype)).sum(1)


def adapter_experts_sorted(y, weights, experts, down, up, scaling, dropout_p=0.0, training=False, block=128):
    """The fast path in plain PyTorch: sort the (token, slot) pairs by expert, grouped matmuls.

    Each expert's rows are padded to whole tiles of `block` rows, so every tile belongs to one
    expert and all tiles run as one batched matmul against their expert's weights. Every shape
    is static (the tile count is an upper bound), so there is no host synchronisation, and the
    path runs on any device, under torch.compile and on the meta device (plan.py traces it).
    Data moves only by gathers, forward and backward (scatters are slow)."""
    N, k = experts.shape
    E = down.shape[0]
    NK, dev = N * k, y.device
    flat = experts.reshape(-1)  # (N*k,) expert of each (token, slot) pair
    if NK < 2 * E:  # few pairs (decoding): a 1-row tile per pair, in pair order; nothing to sort or pad
        pair, tile_expert = torch.arange(NK, device=dev), flat
        real, row_of = torch.ones(NK, dtype=torch.bool, device=dev), pair.view(N, k)
    else:
        pair, real, row_of, tile_expert = _tiles(flat, E, block)
        row_of = row_of.view(N, k)
    sw = (scaling * weights).to(y.dtype)  # (N, k)
    if dropout_p > 0 and training:
        return y + _SortedAdapters.apply(F.dropout(y, dropout_p), sw, down, up, pair, real, row_of, tile_expert, False)
    return _SortedAdapters.apply(y, sw, down, up, pair, real, row_of, tile_expert, True)  # y + adapters


def _tiles(flat, E, block):
    """The tile layout of the sorted path: the (token, slot) pairs sorted by expert, each expert's
    rows padded to whole tiles of `block` rows. Returns (pair of each row, whether a row is real,
    the row of each pair as (N, k), the expert of each tile). Every shape is static: the tile
    count is an upper bound (at most E tiles of padding past the rows)."""
    NK, dev = flat.numel(), flat.device
    block = min(block, 1 << max(0, (NK // E).bit_length() - 1))  # fewer rows: smaller tiles, less padding
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    e_sorted = flat[order]
    counts = torch.zeros(E, dtype=torch.long, device=dev).index_add_(0, flat, torch.ones_like(flat))  # (E,)
    padded = (counts + block - 1) // block * block
    pend = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts  # first sorted pair of each expert
    rows = pend[e_sorted] - padded[e_sorted] + torch.arange(NK, device=dev) - start[e_sorted]  # padded row
    n_tiles = -(-NK // block) + E
    P = n_tiles * block
    row_of = torch.empty_like(rows).scatter_(0, order, rows)  # padded row of each pair
    # padding rows read token 0 with weight 0: finite, and they contribute nothing anywhere
    pair = torch.zeros(P, dtype=torch.long, device=dev).scatter_(0, rows, order)  # pair of each row
    real = torch.zeros(P, dtype=torch.bool, device=dev).scatter_(0, rows, True)
    tile_expert = torch.searchsorted(pend, torch.arange(n_tiles, device=dev) * block, right=True).clamp(max=E - 1)
    return pair, real, row_of, tile_expert


class _SortedAdapters(torch.autograd.Function):
    """sum_j sw_j * U_e(GELU(D_e x)) over tiles of expert-sorted rows, plus x when `residual`.

    The hand-written backward moves dim-sized rows only by gathers (autograd would scatter-add
    them) and scales by the routing weight on the small r-sized side. Nothing dim-sized per row is
    saved for backward, which gathers the rows of x and the tile weights again; a (rows, dim)
    buffer is written over once its contents are used up (out=)."""

    @staticmethod
    def forward(ctx, x, sw, down, up, pair, real, row_of, tile_expert, residual):
        D = x.shape[1]
        T = tile_expert.numel()
        src = pair // sw.shape[1]  # token of each row
        sw_row = (sw.reshape(-1)[pair] * real).view(T, -1, 1)  # (tiles, block, 1), 0 on padding
        X = torch.index_select(x, 0, src).view(T, -1, D)
        Z = torch.bmm(X, _tile_weights(down, tile_expert).transpose(1, 2))  # (tiles, block, r)
        A = torch.bmm(F.gelu(Z) * sw_row, _tile_weights(up, tile_expert).transpose(1, 2), out=X)  # X used up
        out = _sum_slots(A.view(-1, D), row_of)
        if residual:
            out += x
        ctx.save_for_backward(x, Z, sw_row, down, up, src, row_of, tile_expert)
        ctx.residual = residual
        return out

    @staticmethod
    def backward(ctx, g):
        x, Z, sw_row, down, up, src, row_of, tile_expert = ctx.saved_tensors
        N, k = row_of.shape
        T, block, r = Z.shape
        E, _, D = down.shape
        G = torch.index_select(g.contiguous(), 0, src).view(T, block, D)  # each row's output grad
        UtG = torch.bmm(G, _tile_weights(up, tile_expert))  # (tiles, block, r) = U_e^T g
        H = F.gelu(Z)
        d_sw = (UtG * H).sum(-1).view(-1)[row_of.view(-1)].view(N, k)
        d_up = _sum_tiles(torch.bmm(G.transpose(1, 2), H * sw_row), tile_expert, E)
        # exact GELU: d/dz z*Phi(z) = Phi(z) + z*phi(z)
        dZ = UtG * sw_row * (0.5 * (1 + torch.erf(Z * 0.5**0.5)) + Z * torch.exp(-0.5 * Z * Z) * (2 * math.pi) ** -0.5)
        X = torch.index_select(x, 0, src, out=G.view(T * block, D)).view(T, block, D)  # G is used up
        d_down = _sum_tiles(torch.bmm(dZ.transpose(1, 2), X), tile_expert, E)
        dX = torch.bmm(dZ, _tile_weights(down, tile_expert), out=X)  # X is used up
        dx = _sum_slots(dX.view(T * block, D), row_of)
        if ctx.residual:
            dx += g
        return dx, d_sw, d_down, d_up, None, None, None, None, None


def _tile_weights(w, tile_expert):
    """Each tile's expert weights, w[tile_expert]: (E, a, b) -> (tiles, a, b). A 2-D index_select
    is the fast gather on the CPU (3-D index_select is 20x slower)."""
    E, a, b = w.shape
    return torch.index_select(w.reshape(E, a * b), 0, tile_expert).view(-1, a, b)


def _sum_tiles(per_tile, tile_expert, E):
    """Sum the per-tile weight gradients of each expert: (tiles, a, b) -> (E, a, b)."""
    T, a, b = per_tile.shape
    return per_tile.new_zeros(E, a * b).index_add_(0, tile_expert, per_tile.view(T, a * b)).view(E, a, b)


def _sum_slots(rows, row_of):
    """out[n] = sum_j rows[row_of[n, j]]: an embedding bag in sum mode, which reads the k rows of
    each token once (about 1.5x faster on the CPU than one gather per slot summed in place)."""
    return F.embedding_bag(row_of, rows, mode="sum")


def adapter_experts_grouped(y, weights, experts, down, up, scaling, dropout_p=0.0, training=False):
    """The adapters as two grouped GEMMs (torch's grouped_mm) over the expert-sorted pairs: on
    sm90+ in bf16 one fused kernel each; elsewhere ATen runs the groups one after another (fast on
    the CPU without autograd; its meta kernel, which torch.compile traces with, takes bf16 only).

    The group ends come from the sorted expert ids by searchsorted, on the device: no host sync
    and no loop over experts; an empty expert is an empty group. The last group ends at N*k,
    the number of rows, so no output row is left unwritten (grouped_mm leaves rows past the
    last offset as they were: uninitialised memory). grouped_mm's own autograd does backward."""
    N, k = experts.shape
    E = down.shape[0]
    flat = experts.reshape(-1)  # (N*k,) expert of each (token, slot) pair
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    group_end = torch.searchsorted(flat[order], torch.arange(E, device=y.device), right=True).int()  # (E,)
    yd = F.dropout(y, dropout_p, training) if dropout_p > 0 else y
    sw = (scaling * weights).to(y.dtype).reshape(-1)[order]  # (N*k,) routing weight of each row
    x = yd[order // k]  # (N*k, D) each row's token
    h = F.gelu(F.grouped_mm(x, down.transpose(1, 2), offs=group_end)) * sw[:, None]  # (N*k, r)
    a = F.grouped_mm(h, up.transpose(1, 2), offs=group_end)  # (N*k, D)
    row_of = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=y.device)).view(N, k)
    return y + _sum_slots(a, row_of)


def grouped_mm_fused(y, down) -> bool:
    """Whether torch's grouped_mm is one fused kernel for these adapters: CUDA bf16 on sm90+ with
    16-byte aligned rows."""
    E, r, D = down.shape
    return (y.is_cuda and y.dtype == torch.bfloat16 and down.dtype == y.dtype
            and torch.cuda.get_device_properties(y.device).major >= 9 and D % 8 == 0 and r % 8 == 0)


def adapter_path(y, down) -> str:
    """Which implementation adapter_experts runs: "grouped" where grouped_mm is a fused kernel,
    and on the CPU outside autograd and torch.compile (generation, serving: ATen runs the groups
    back to back with nothing padded, 1.2-2.4x the sorted path's forward); "triton" on other GPUs
    (and wherever PESC_KERNELS=triton); else "sorted", whose backward the training step needs (and
    which runs under torch.compile and on the meta device, where grouped_mm takes bf16 only)."""
    mode = kernels.mode()
    if mode != "triton" and grouped_mm_fused(y, down):
        return "grouped"
    if kernels.use_triton(y):
        return "triton"
    cpu_inference = y.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    return "grouped" if cpu_inference else "sorted"


def adapter_experts(y, weights, experts, down, up, scaling, dropout_p=0.0, training=False):
    """y + sum_j w_j * s * U_e(GELU(D_e(dropout(y)))), by the implementation adapter_path picks."""
    # trainers keep fp32 master weights under bf16 autocast; every path computes in y's dtype, and
    # casting here (outside the hand-written backward passes) hands the gradients back in fp32
    down, up = down.to(y.dtype), up.to(y.dtype)
    path = adapter_path(y, down)
    fn = {"grouped": adapter_experts_grouped, "triton": kernels.adapter_experts, "sorted": adapter_experts_sorted}[path]
    return fn(y, weights, experts, down, up, scaling, dropout_p, training)


class PESCFeedForward(nn.Module):
    """The frozen dense FFN, shared by E adapter experts picked by a top-k router.

    Built from a PESCConfig (E and r are then the tensors' shapes) and called with it, the
    model's config.moe: forward(x, config, valid) -> (out, RouterTerms of this layer)."""

    def __init__(self, ffn: nn.Module, config: PESCConfig):
        super().__init__()
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3  # keep the dense names and tensors
        dim = self.w1.in_features
        E, r = config.num_experts, config.adapter_dim
        nf4 = isinstance(self.w1, quant.NF4Linear)  # QLoRA: the adapters take the dtype it came from
        device, dtype = (self.w1.codes.device, self.w1.dtype) if nf4 else (self.w1.weight.device, self.w1.weight.dtype)
        self.router = nn.Linear(dim, E, bias=False, device=device, dtype=dtype)
        self.adapter_down = nn.Parameter(torch.empty(E, r, dim, device=device, dtype=dtype))  # D_e
        self.adapter_up = nn.Parameter(torch.zeros(E, dim, r, device=device, dtype=dtype))  # U_e = 0
        # D_e as nn.Linear(dim, r) would be: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(dim), 1/sqrt(dim))
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.adapter_down, -bound, bound)

    def forward(self, x, config: PESCConfig, valid=None):
        B, T, D = x.shape
        a, b = self.w1(x), self.w3(x)
        h = kernels.swiglu(a, b) if kernels.use_triton(a) else F.silu(a) * b
        y = self.w2(h).view(B * T, D)  # the shared FFN, once per token

        logits = self.router(x.view(B * T, D))  # (N, E)
        weights, experts = route(logits, config.top_k)  # (N, k)
        out = adapter_experts(y, weights, experts, self.adapter_down, self.adapter_up,
                              config.adapter_scaling, config.adapter_dropout, self.training)
        terms = router_losses(logits, experts, None if valid is None else valid.reshape(-1))
        return out.view(B, T, D), terms


# -----------------------------------------------------------------------------
# Load balancing


class RouterTerms(NamedTuple):
    """The router's load-balancing terms, unweighted: one layer's, or their mean over layers."""

    aux_loss: torch.Tensor  # () Switch Transformer loss, 1.0 at perfect balance
    z_loss: torch.Tensor  # () ST-MoE router z-loss
    load: torch.Tensor  # (E,) token assignments per expert, or (L, E) per layer; no gradient


def router_losses(logits, experts, valid=None) -> RouterTerms:
    """Switch Transformer load-balancing loss, ST-MoE z-loss and the expert load of one layer.

    aux = E * sum_i f_i * P_i, f_i = share of (token, slot) assignments that went to expert i,
    P_i = mean router probability of expert i. 1.0 at perfect balance; the gradient reaches
    the router through P. Padding (valid == False) is left out of everything. No host sync."""
    N, E = logits.shape
    k = experts.shape[1]
    m = torch.ones(N, device=logits.device) if valid is None else valid.float()  # (N,)
    n = m.sum().clamp(min=1)
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    load = torch.zeros(E, device=logits.device).index_add_(0, experts.reshape(-1), m.repeat_interleave(k))
    f = load / (n * k)
    P = (probs * m[:, None]).sum(0) / n
    aux = E * (f * P).sum()
    z = (torch.logsumexp(logits.float(), dim=-1).pow(2) * m).sum() / n
    return RouterTerms(aux, z, load.detach())


def mean_router_terms(per_layer) -> RouterTerms:
    """The model's terms from each layer's: aux and z averaged over layers, loads stacked (L, E)."""
    return RouterTerms(torch.stack([t.aux_loss for t in per_layer]).mean(),
                       torch.stack([t.z_loss for t in per_layer]).mean(),
                       torch.stack([t.load for t in per_layer]))


def pesc_layers(model):
    return [m for m in model.modules() if isinstance(m, PESCFeedForward)]


# -----------------------------------------------------------------------------
# LoRA on the base linears


class LoRALinear(nn.Linear):
    """A frozen base linear plus a trainable low-rank update: base(x) + (alpha/r) B A dropout(x).

    The base is an nn.Linear, whose weight and bias become this module's (state-dict keys
    unchanged), or a quant.NF4Linear (QLoRA), kept whole as `.base`: its NF4 weight has no
    state-dict key. The LoRA tensors start in the base weight's dtype."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, quant.NF4Linear):
            self.base, self.weight, self.bias = base, None, None
            device, dtype = base.codes.device, base.dtype
        else:
            self.base = None
            self.weight, self.bias = base.weight, base.bias  # same tensors: state-dict keys unchanged
            device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # B = 0: starts as the base linear
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.base is not None:  # an NF4 base (QLoRA): its own matmul, then the plain update
            base = self.base(x)
            # fp32 LoRA beside a bf16-computing NF4 base: in x's dtype
            lora = F.linear(F.linear(self.lora_dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
            return base + self.scale * lora.to(base.dtype)
        return lora_linear(x, self.lora_dropout(x), self.weight, self.bias, self.lora_a, self.lora_b, self.scale)


def lora_linear_plain(x, x_drop, weight, bias, lora_a, lora_b, scale):
    """The twin of lora_linear: W x + b + scale * B A x_drop, as three linears, a scale and an add."""
    base = F.linear(x, weight, bias)
    return base + scale * F.linear(F.linear(x_drop, lora_a.to(x.dtype)), lora_b.to(x.dtype)).to(base.dtype)


def lora_linear(x, x_drop, weight, bias, lora_a, lora_b, scale):
    """W x + b + scale * B A x_drop with the scale and the add inside the matmuls, forward and
    backward (addmm into the base output and into the input gradient): the plain twin spends
    two full-size elementwise passes per LoRA linear and direction on them. x_drop is x (the
    same tensor) without dropout, which lets the input gradient be one addmm as well."""
    return _LoRALinear.apply(x, x_drop, weight, bias, lora_a, lora_b, scale)


class _LoRALinear(torch.autograd.Function):
    """lora_linear's matmuls in the compute dtype (autocast's, else x's), by hand in backward."""

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, scale):
        device = x.device.type
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # meta: a plan's trace
        dt = torch.get_autocast_dtype(device) if autocast else x.dtype
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            W, A, Bs = weight.to(dt), lora_a.to(dt), (scale * lora_b).to(dt)  # Bs: r columns, cheap
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            xd2 = x2 if x_drop is x else x_drop.reshape(-1, x.shape[-1]).to(dt)
            h = torch.mm(xd2, A.t())  # (N, r)
            out = torch.mm(x2, W.t()) if bias is None else torch.addmm(bias.to(dt), x2, W.t())
            out.addmm_(h, Bs.t())
        keep_x = weight.requires_grad or x_drop is x  # for W's gradient, or A's without dropout
        ctx.save_for_backward(x2 if keep_x else None, xd2 if x_drop is not x else None, h, W, A, Bs)
        ctx.same_input, ctx.scale = x_drop is x, scale
        ctx.dtypes = (x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        x2, xd2, h, W, A, Bs = ctx.saved_tensors
        x_dtype, w_dtype, a_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1]).to(W.dtype)
        dh = torch.mm(g2, Bs)  # (N, r), the scale already in Bs
        d_b = torch.mm(g2.t(), h).mul_(ctx.scale).to(b_dtype) if need[5] else None
        d_a = torch.mm(dh.t(), x2 if ctx.same_input else xd2).to(a_dtype) if need[4] else None
        dx = dxd = None
        if need[0] or need[1]:
            dx = torch.mm(g2, W)
            if ctx.same_input:
                dx.addmm_(dh, A)
            else:
                dxd = torch.mm(dh, A).view(*g.shape[:-1], -1).to(x_dtype)
            dx = dx.view(*g.shape[:-1], -1).to(x_dtype)
        d_w = torch.mm(g2.t(), x2).to(w_dtype) if need[2] else None
        d_bias = g2.sum(0).to(w_dtype) if ctx.has_bias and need[3] else None
        return dx, dxd, d_w, d_bias, d_a, d_b, None


def add_lora(model, config: LoRAConfig):
    """Wrap the target linears of every layer in LoRA, in place, and record config in
    model.config.lora; a base linear may be full precision (nn.Linear) or NF4 (quant.NF4Linear)."""
    if model.config.lora is not None:
        raise ValueError("the model already has LoRA on its base linears")
    names = {LINEARS[t][0] for t in config.targets}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in names and type(child) in (nn.Linear, quant.NF4Linear):
                setattr(module, name, LoRALinear(child, config.rank, config.alpha, config.dropout))
    model.config = replace(model.config, lora=config)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRA update into its base weight and drop the LoRA tensors (in place).

    An NF4 base becomes a full-precision nn.Linear (dequantized weight + update, in the LoRA's
    dtype): the sum is not on the NF4 grid. To merge into the original base instead, add the
    update to the base's file tensors, as the training export does (checkpoint.export)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = child.scale * (child.lora_b.float() @ child.lora_a.float())
                if child.base is not None:
                    nf4 = child.base
                    weight = nn.Parameter((quant.dequantize_nf4(nf4.packed) + delta.to(nf4.codes.device))
                                          .to(child.lora_a.dtype), requires_grad=False)
                    bias = nf4.bias
                else:
                    child.weight += delta.to(child.weight.dtype)
                    weight, bias = child.weight, child.bias
                plain = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta")
                plain.weight, plain.bias = weight, bias
                setattr(module, name, plain)
    model.config = replace(model.config, lora=None)
    return model


# -----------------------------------------------------------------------------
# Upcycling, and the model each training mode trains


def upcycle(model, config: PESCConfig):
    """Turn a dense model into a PESC model, in place, and return it.

    Each FFN becomes a PESCFeedForward holding the same (now frozen) weights; the adapters'
    up-projections start at zero, so the logits are exactly the dense model's. Afterwards
    set_trainable(model, "pesc") holds."""
    if model.config.moe is not None:
        raise ValueError("model is already a PESC model")
    for layer in model.layers:
        layer.feed_forward = PESCFeedForward(layer.feed_forward, config)
    model.config = replace(model.config, moe=config)
    return set_trainable(model, "pesc")


TRAIN_MODES = ("pesc", "lora", "full")


def make_trainable(model, mode: str, pesc: PESCConfig, lora: LoRAConfig | None):
    """The model a training mode trains, built in place from the checkpoint's model; returns it.

    pesc: a dense model is upcycled with `pesc`; a PESC model keeps its experts (the architecture
      in its config wins) and takes pesc's training knobs (adapter dropout, loss weights). LoRA
      per `lora` (None: none) wraps the base linears, unless the model holds unmerged LoRA,
      which must then have lora's rank and keeps its own settings.
    lora: the dense baseline, LoRA only. full: everything trains."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; known: {', '.join(TRAIN_MODES)}")
    if mode == "pesc":
        old = model.config.moe
        if old is None:
            upcycle(model, pesc)
        else:
            knobs = dict(adapter_dropout=pesc.adapter_dropout, aux_loss_coef=pesc.aux_loss_coef,
                         z_loss_coef=pesc.z_loss_coef)
            model.config = replace(model.config, moe=replace(old, **knobs))
        held = model.config.lora
        if held is not None and (lora is None or lora.rank != held.rank):
            raise ValueError(f"the checkpoint holds unmerged LoRA of rank {held.rank}; "
                             f"the LoRA asked for has rank {lora.rank if lora else 0}")
        if held is None and lora is not None:
            add_lora(model, lora)
    elif mode == "lora":
        if model.config.moe is not None:
            raise ValueError("mode lora trains the dense baseline, but this is a PESC checkpoint")
        if lora is None:
            raise ValueError("mode lora needs LoRA (a rank of at least 1)")
        add_lora(model, lora)
    return set_trainable(model, mode)


def set_trainable(model, mode: str):
    """Which tensors train, per training mode, in place; returns the model.

    pesc: the routers, the adapters and any LoRA; lora (the dense baseline): the LoRA only;
    full: everything. Everything else is frozen."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; known: {', '.join(TRAIN_MODES)}")
    if mode == "pesc" and model.config.moe is None:
        raise ValueError("mode pesc needs a PESC model (upcycle the dense one first)")
    if mode == "lora" and model.config.lora is None:
        raise ValueError("mode lora needs LoRA on the base linears (add_lora first)")
    model.requires_grad_(mode == "full")
    for m in model.modules():
        if isinstance(m, LoRALinear):
            trained = (m.lora_a, m.lora_b)
        elif isinstance(m, PESCFeedForward) and mode == "pesc":
            trained = (m.router.weight, m.adapter_down, m.adapter_up)
        else:
            continue
        for p in trained:
            p.requires_grad_(True)
    return model


def cast_for_training(module, dtype):
    """Frozen tensors in the compute dtype; trainable ones in fp32 (the optimizer's master copy,
    autocast computes in dtype). An NF4 base's packed bytes are never converted
    (quant.NF4Linear.flatten_)."""
    nf4_bytes = {id(m.storage) for m in module.modules() if isinstance(m, quant.NF4Linear) and m.layout}
    for p in module.parameters():
        if id(p) not in nf4_bytes:
            p.data = p.data.float() if p.requires_grad else p.data.to(dtype)


def trainable_report(model) -> str:
    """'trainable 12,345 of 6,789,012 parameters (0.18%)'."""
    total, trainable = model.num_params(), model.num_params(trainable_only=True)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
