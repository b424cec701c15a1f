"""
The LLaMA-family decoder (Llama 2, Llama 3/3.1, Mistral, Yi, Qwen1.5/2) in one file.

Read top to bottom: the config and its presets, RMSNorm, RoPE (with its scaling variants),
the attention mask, attention with an opt-in static KV cache, the SwiGLU FFN, the block, the
Transformer and what its forward returns, FLOPs/MFU, and the checkpoint format (config.json +
safetensors). The PESC Mixture-of-adapters lives in moe.py and
replaces each block's FFN when `config.moe` is set; the Triton kernels in kernels.py replace the
plain PyTorch math here when `kernels.use_triton(x)` says so (the code below is their twin).

Internal layout: q/k rows are in the Hugging Face "rotate halves" order, so HF checkpoints load
as they are and Meta checkpoints are permuted on import (convert.py).
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import moe
import quant
from files import checkpoint_files, mmap_safetensors, write_checkpoint
from moe import LoRAConfig, PESCConfig

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...} as in HF configs
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: Optional[int] = None
    moe: Optional[PESCConfig] = None  # None: dense FFN; else every FFN is a PESC layer
    lora: Optional[LoRAConfig] = None  # None: plain base linears; else LoRA on the target ones

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if isinstance(self.moe, dict):
            self.moe = PESCConfig(**self.moe)
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("rope_type", rs.pop("type", None))  # legacy HF key
            if rs["rope_type"] not in ("linear", "dynamic", "llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {rs['rope_type']!r}")
            self.rope_scaling = None if rs["rope_type"] == "default" else rs

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["lora"] is None:  # written only when there is LoRA: other checkpoints keep their old layout
            del d["lora"]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown model config key(s) {unknown}")
        d = dict(d)
        if d.get("moe") is not None:
            moe_dict = dict(d["moe"])
            # written before LoRA had a config of its own: it lived in the PESC settings
            old_lora = {k[len("lora_"):]: moe_dict.pop(k) for k in list(moe_dict) if k.startswith("lora_")}
            if old_lora.get("rank", 0) > 0:
                d["lora"] = old_lora
            d["moe"] = PESCConfig.from_dict(moe_dict, source)
        if d.get("lora") is not None:
            d["lora"] = LoRAConfig.from_dict(d["lora"], source)
        return cls(**d)


# Llama 3.1's RoPE scaling (HF's rope_scaling, Meta's use_scaled_rope)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, vocab_size=32000),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, vocab_size=32000),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                      rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
                       rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                        rope_theta=500000.0, max_seq_len=131072, rope_scaling=LLAMA3_ROPE),
    "mistral-7b-v0.1": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                            max_seq_len=32768, sliding_window=4096),
    "mistral-7b-v0.2": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                            rope_theta=1e6, max_seq_len=32768),
    "yi-6b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=4, ffn_dim=11008, vocab_size=64000,
                  rope_theta=5e6),
    "yi-34b": dict(dim=7168, n_layers=60, n_heads=56, n_kv_heads=8, ffn_dim=20480, vocab_size=64000,
                   rope_theta=5e6),
    "qwen1.5-14b": dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13696, vocab_size=152064, norm_eps=1e-6,
                        rope_theta=1e6, qkv_bias=True, max_seq_len=32768),
    # tiny configs for tests and the CPU demo
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=256),
    "tiny-qwen": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=256,
                      qkv_bias=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, vocab_size=512, max_seq_len=512),
}

# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """norm(x), or with a residual: (norm(x + residual), x + residual), fused on GPU."""
        if kernels.use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_torch(x, self.weight, self.eps, residual)


def rms_norm_torch(x, weight, eps, residual=None):
    """RMSNorm in plain PyTorch (the reference for kernels.rms_norm), with the optional residual add."""
    h = x if residual is None else x + residual
    hf = h.float()  # the statistics in fp32, as HF and Meta do
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, h)


def rope_inv_freq(config: ModelConfig, seq_len: Optional[int] = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) with the config's RoPE scaling applied.

    seq_len matters only for dynamic NTK scaling, which stretches the base once a sequence
    outgrows the trained context (as HF does, evaluated at the current length)."""
    hd, base = config.head_dim, config.rope_theta
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type")
    if kind == "dynamic" and seq_len is not None:
        orig = rs.get("original_max_position_embeddings") or config.max_seq_len
        if seq_len > orig:
            factor = rs["factor"]
            base = base * ((factor * seq_len / orig) - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        orig = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - lo) / (hi - lo)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < orig / hi, inv_freq,
                               torch.where(wavelen > orig / lo, inv_freq / factor, scaled))
    return inv_freq


def attention_mask(q_pos, k_pos, q_doc=None, k_doc=None, sliding_window=None):
    """(B, T, S) bool, True where query t may attend key s: the one attention rule.

    A query sees the keys of its own document (when doc ids are given) whose RoPE position is
    not after its own and, with a sliding window, fewer than sliding_window positions before.
    Positions count from each document's start, one per token, so within a document "not after
    by position" is "not after by slot". q_pos, q_doc: (B or 1, T); k_pos, k_doc: (B or 1, S)."""
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    visible = kp <= qp
    if q_doc is not None:
        visible = visible & (q_doc[..., :, None] == k_doc[..., None, :])
    if sliding_window is not None:
        visible = visible & (qp - kp < sliding_window)
    return visible


def apply_rope(x, cos, sin):
    """Rotate halves (HF layout). x: (B, T, H, hd); cos, sin: (B or 1, T, hd//2) fp32."""
    if kernels.use_triton(x):
        return kernels.apply_rope(x, cos, sin)
    return apply_rope_torch(x, cos, sin)


def apply_rope_torch(x, cos, sin):
    """apply_rope in plain PyTorch (the reference for kernels.apply_rope), in fp32."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, Hkv, T, hd) at columns input_pos; return the whole cache."""
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is None:  # plain causal attention over this call's tokens: the flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif not isinstance(mask, torch.Tensor):  # a BlockMask (document_block_mask)
            y = _flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def document_block_mask(doc_ids, positions, sliding_window=None):
    """attention_mask's rule as FlexAttention's BlockMask, for packed rows without a (T, T)
    tensor: doc_ids, positions (B or 1, T). Blocks with nothing visible are skipped, so the
    attention costs the documents' own squares; one mask serves every layer. The dense mask
    stays the CPU path and the reference."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape
    pos = positions.expand(B, T)

    def visible(b, h, q, k):
        seen = (pos[b, k] <= pos[b, q]) & (doc_ids[b, q] == doc_ids[b, k])
        return seen if sliding_window is None else seen & (pos[b, q] - pos[b, k] < sliding_window)

    return create_block_mask(visible, B, None, T, T, device=doc_ids.device)


def use_flex_attention(x) -> bool:
    """Whether packed rows take document_block_mask: on CUDA, where FlexAttention compiles to a
    fused kernel (on the CPU it runs unfused, forward only, slower than the dense mask)."""
    return x.is_cuda


_FLEX = []


def _flex_attention():
    """flex_attention, compiled once: eager it would materialise the scores it exists to avoid.
    Inside a compiled region the compiler fuses it anyway."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return flex_attention
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


class FeedForward(nn.Module):
    """The dense SwiGLU FFN: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


def swiglu(a, b):
    if kernels.use_triton(a):
        return kernels.swiglu(a, b)
    return swiglu_torch(a, b)


def swiglu_torch(a, b):
    """silu(a) * b in plain PyTorch (the reference for kernels.swiglu)."""
    return F.silu(a) * b


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x, cos, sin, mask, input_pos=None, valid=None, moe_config=None):
        """(output, the PESC layer's moe.RouterTerms or None); moe_config: the model's config.moe."""
        a = self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        hn, h = self.ffn_norm(a, residual=x)  # hn = norm(x + a), h = x + a
        if moe_config is None:
            return h + self.feed_forward(hn), None
        out, router = self.feed_forward(hn, moe_config, valid)
        return h + out, router


# -----------------------------------------------------------------------------
# The model


class ModelOutput(tuple):
    """What the forward computed. As a tuple it is (logits, loss), so `logits, loss = model(idx,
    targets)` unpacks and `model(idx)[0]` is the logits; the parts of the loss come by name.

    loss: the training objective, lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
      (the only place the terms are added); None without targets.
    lm_loss: the mean next-token cross-entropy; None without targets.
    aux_loss, z_loss: the router's load-balancing and z-loss, unweighted, mean over layers;
    expert_load: (L, E) token assignments per layer and expert. All three None for a dense model."""

    def __new__(cls, logits, loss=None, lm_loss=None, router=None):
        out = super().__new__(cls, (logits, loss))
        out.lm_loss = lm_loss
        out.aux_loss, out.z_loss, out.expert_load = router if router is not None else (None, None, None)
        return out

    logits = property(lambda self: self[0])
    loss = property(lambda self: self[1])


class LMHead(nn.Linear):
    """The output projection. loss() is the chunked LM head + cross-entropy, which never holds the
    (tokens, vocab) logits; a method of this module rather than of the model because FSDP gathers
    a sharded unit's weights around the unit's registered methods (train.shard_model)."""

    def loss(self, h, targets):
        return kernels.linear_cross_entropy(h, self.weight, targets)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = LMHead(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # With the KV cache: the RoPE position and document of the token in each cache slot,
        # (batch, slots); what attention_mask compares a query with. None: no cache.
        self.register_buffer("slot_positions", None, persistent=False)
        self.register_buffer("slot_doc_ids", None, persistent=False)
        self.config = replace(config, moe=None, lora=None)  # the dense model; what follows adds to it
        if config.moe is not None:  # a PESC model: every FFN becomes a mixture of adapters
            moe.upcycle(self, config.moe)
        if config.lora is not None:  # LoRA on the base linears (a model in training)
            moe.add_lora(self, config.lora)

    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        """Allocate a static KV cache of max_seq_len slots; afterwards call model(idx, input_pos=pos)."""
        w = self.output.weight
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim, w.dtype, w.device)
        # an empty slot holds the largest position: no query is at or after it, so none sees it
        shape = (max_batch_size, max_seq_len)
        self.slot_positions = torch.full(shape, torch.iinfo(torch.long).max, dtype=torch.long, device=w.device)
        self.slot_doc_ids = torch.zeros(shape, dtype=torch.long, device=w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.slot_positions = self.slot_doc_ids = None

    def forward(self, idx, targets=None, input_pos=None, *, positions=None, doc_ids=None, valid=None):
        """Return a ModelOutput: (logits, loss) as a tuple, the loss's parts by name.

        idx: (B, T) token ids. targets: (B, T), -100 = ignored. input_pos: (T,) positions of
        idx's columns, required with the KV cache (they are the cache slots written).
        Optional, for packed rows and padded batches:
          positions (B, T): RoPE positions per row, from 0 at each document's start (default:
            input_pos, or 0..T-1);
          doc_ids (B, T): the document of each token; attention stays inside a document
            (attention_mask has the whole rule). With the cache they are recorded per slot.
          valid (B, T) bool: real (non-padding) tokens, so padding does not count in the
            MoE load-balancing statistics.
        logits are (B, T, vocab); with targets and the fused LM-head loss they are None.
        """
        B, T = idx.shape
        cached = self.slot_positions is not None
        if cached and input_pos is None:
            raise ValueError("with a KV cache, pass input_pos (the positions of idx's columns)")
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        if positions is None:
            positions = input_pos[None, :]  # (1, T)

        inv_freq = self.inv_freq
        if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
            inv_freq = rope_inv_freq(self.config, int(positions.max()) + 1).to(idx.device)
        freqs = positions[..., None].float() * inv_freq  # (B or 1, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        mask = self._mask(B, positions, doc_ids, input_pos if cached else None)

        h = self.tok_embeddings(idx)
        per_layer = []
        for layer in self.layers:
            h, router = layer(h, cos, sin, mask, input_pos if cached else None, valid, self.config.moe)
            per_layer.append(router)
        h = self.norm(h)
        router = moe.mean_router_terms(per_layer) if self.config.moe is not None else None

        if targets is None:
            return ModelOutput(self.output(h), router=router)
        if kernels.use_triton(h):  # chunked LM head + loss: no (tokens, vocab) logits in memory
            logits = None
            lm_loss = self.output.loss(h.reshape(B * T, -1), targets.reshape(-1))
        else:
            logits = self.output(h)
            lm_loss = cross_entropy(logits, targets)
        loss = lm_loss
        if router is not None:
            c = self.config.moe
            loss = lm_loss + c.aux_loss_coef * router.aux_loss + c.z_loss_coef * router.z_loss
        return ModelOutput(logits, loss, lm_loss, router)

    def _mask(self, B, positions, doc_ids, cache_slots):
        """attention_mask for this call as (B, 1, T, S), or None for plain causal attention over
        the call's own tokens (SDPA's flash path). With the cache, this call's tokens are
        recorded in their slots first, and the keys are all slots."""
        window = self.config.sliding_window
        if cache_slots is not None:
            T = cache_slots.numel()
            docs = torch.zeros_like(positions) if doc_ids is None else doc_ids
            self.slot_positions[:B, cache_slots] = positions.expand(B, T)
            self.slot_doc_ids[:B, cache_slots] = docs.expand(B, T)
            mask = attention_mask(positions, self.slot_positions[:B], docs, self.slot_doc_ids[:B], window)
        elif doc_ids is None and window is None:
            return None
        elif doc_ids is not None and use_flex_attention(positions):  # no (T, T) tensor at all
            return document_block_mask(doc_ids, positions, window)
        else:
            mask = attention_mask(positions, positions, doc_ids, doc_ids, window)
        return mask[:, None]  # broadcast over heads

    # -- sizes, FLOPs, MFU ------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}.values()  # a tied weight counts once
        n = sum(p.numel() for p in params if p.requires_grad or not trainable_only)
        if not trainable_only:  # NF4 base weights are buffers, frozen
            n += sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, quant.NF4Linear))
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """FLOPs one training step does per token (forward + backward), counting what autograd
        runs with a frozen base. Per weight n of a matmul, per token:

            forward                                   2n
            input gradient  (dL/dx = W^T dL/dy)        2n  only if a gradient must flow below it
            weight gradient (dL/dW = dL/dy x^T)        2n  only if W is trained

        A gradient must flow below a matmul when anything trained lies below it (or beside it on
        the same input: LoRA on wq needs the attention's backward, not wq's input gradient). So
        with PESC alone, the first block's attention runs forward only, and every block's frozen
        linears above it cost 4n; trained tensors (LoRA A/B, routers, the k of E adapters a token
        uses) cost 6n, except where no gradient flows below them (lora_a's input gradient).
        Attention scores and values cost 4 * seq_len * heads * head_dim per layer forward, twice
        that backward when a gradient flows through them (not discounted for causality, as in
        PaLM's formula). Norms, RoPE and the softmax are not counted."""
        c = self.config
        attention = 4 * seq_len * c.n_heads * c.head_dim
        flops, flows = 0.0, self.tok_embeddings.weight.requires_grad
        for layer in self.layers:
            a, ff = layer.attention, layer.feed_forward
            flows |= layer.attention_norm.weight.requires_grad
            f, flows = _matmul_flops([a.wq, a.wk, a.wv], flows)
            flops += f + attention * (3 if flows else 1)
            f, flows = _matmul_flops([a.wo], flows)
            flops += f
            flows |= layer.ffn_norm.weight.requires_grad
            router_in = flows  # the router and w1, w3 read the same input
            f, flows = _matmul_flops([ff.w1, ff.w3], flows)
            flops += f
            f, flows = _matmul_flops([ff.w2], flows)
            flops += f
            if isinstance(ff, moe.PESCFeedForward):  # router and adapters are always trained
                E, k = ff.adapter_down.shape[0], self.config.moe.top_k
                down, up = ff.adapter_down.numel() * k / E, ff.adapter_up.numel() * k / E
                n_router = ff.router.weight.numel()
                flops += 6 * up + (6 if flows else 4) * down + (6 if router_in else 4) * n_router
                flows = True
        f, _ = _matmul_flops([self.output], flows | self.norm.weight.requires_grad)
        return flops + f

    def estimate_mfu(self, tokens_per_sec: float, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOP/s over the hardware's peak (see peak_flops)."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    # -- checkpoints -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, quantize=None, mmap=False, quantize_on=None):
        """Load a project checkpoint directory strictly: every tensor present, known, well shaped.

        The model is built on the meta device and the loaded tensors are assigned into it, so
        loading never holds two copies of the weights. quantize="nf4" stores the seven base
        linears of every layer (q, k, v, o, gate, up, down) in NF4 (quant.py) as each tensor
        streams in, so the full-precision base is never in memory at once; dtype then applies to
        the other tensors (embeddings, norms, LM head, biases, routers, adapters, LoRA).
        mmap=True (CPU) leaves the other tensors mapped from the files: nothing is read until
        touched, so a process that copies out only a shard of each tensor (FSDP) never has the
        whole model resident. quantize_on: the device that quantizes, when not `device` (a GPU
        quantizes a 70B base in seconds, a CPU in about an hour); the result goes to `device`."""
        from safetensors import safe_open

        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize={quantize!r}: expected None or 'nf4'")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file}: no config.json, not a project checkpoint")
        with open(cfg_file) as f:
            config = ModelConfig.from_dict(json.load(f), cfg_file)
        if quantize and config.lora is not None:
            raise ValueError(f"{cfg_file}: the checkpoint carries unmerged LoRA; merge it into the base "
                             f"(moe.merge_lora, then save_pretrained) before loading with quantize='nf4'")
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.state_dict())
        if config.tie_embeddings:
            expected.pop("output.weight")

        files = checkpoint_files(path)
        device = torch.device(device or "cpu")
        state, where, packed = {}, {}, {}
        for fname in files:
            mapped = mmap_safetensors(fname) if mmap else None
            with safe_open(fname, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key not in expected:
                        quantized = any(s in key for s in (".absmax", ".quant_map", ".quant_state", ".SCB"))
                        raise KeyError(f"{fname}: unexpected tensor {key!r} for this config"
                                       + (" (the checkpoint is already quantized; load the full-precision "
                                          "base)" if quantized else ""))
                    t = mapped.pop(key) if mapped is not None else f.get_tensor(key)  # pop: an NF4 source unmaps
                    if t.shape != expected[key].shape:
                        raise ValueError(f"{fname}: tensor {key!r} has shape {tuple(t.shape)}, "
                                         f"config expects {tuple(expected[key].shape)}")
                    if quantize and QUANTIZED_KEY.fullmatch(key):
                        if not t.is_floating_point():
                            raise ValueError(f"{fname}: {key!r} is {t.dtype}, already quantized; "
                                             f"quantize='nf4' needs the full-precision base")
                        # t is dropped here: one tensor at a time
                        packed[key] = quant.quantize_nf4(t.to(quantize_on or device)).to(device)
                    else:
                        state[key] = t.to(dtype) if dtype is not None else t
                    where[key] = fname
        missing = sorted(set(expected) - set(where))
        if missing:
            raise KeyError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for key, p in packed.items():  # the meta nn.Linear gives way to the NF4 linear
            parent, name = key[:-len(".weight")].rsplit(".", 1)
            module = model.get_submodule(parent)
            setattr(module, name, quant.NF4Linear(p, getattr(module, name).bias))
        if config.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_inv_freq(config).to(device)
        return model

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """Write config.json + safetensors (sharded with an index above max_shard_bytes).

        Everything goes to a temporary directory beside `path` that is renamed at the end, so a
        crash never leaves a half-written checkpoint under the final name."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("output.weight")
        write_checkpoint(path, self.config.to_dict(), state, max_shard_bytes)


def _matmul_flops(linears, flows):
    """(FLOPs per token, whether a gradient flows above) of linears that read one input, given
    whether a gradient must flow below them (see Transformer.flops_per_token)."""
    flops, trained = 0.0, False
    for m in linears:
        n = m.in_features * m.out_features
        w_trained = getattr(m, "weight", None) is not None and m.weight.requires_grad  # NF4: frozen, no .weight
        flops += 2 * n + (2 * n if flows else 0) + (2 * n if w_trained else 0)
        trained |= w_trained
        if isinstance(m, moe.LoRALinear):  # x -> A -> B: B's input gradient is needed for A's
            flops += 6 * m.lora_b.numel() + (6 if flows else 4) * m.lora_a.numel()
            trained = True
    return flops, flows or trained


# Dense (no sparsity) peak FLOP/s of each GPU's tensor cores, by compute dtype, from the vendor
# datasheets (SXM parts). Looked up by a substring of torch.cuda.get_device_name(), in order.
PEAK_FLOPS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, "tf32": 495e12, torch.float32: 67e12},
    "H100 PCIe": {torch.bfloat16: 756e12, torch.float16: 756e12, "tf32": 378e12, torch.float32: 51e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, "tf32": 495e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, "tf32": 156e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, "tf32": 183e12, torch.float32: 91.6e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, "tf32": 60e12, torch.float32: 30.3e12},
}


def peak_flops(device=None, dtype=torch.bfloat16):
    """Peak FLOP/s of a CUDA device for matmuls in dtype (fp32 counts as tf32 where torch lets
    matmuls use it), or None: a CPU, or a GPU not in PEAK_FLOPS."""
    if torch.device(device or "cpu").type != "cuda":
        return None
    key = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype
    name = torch.cuda.get_device_name(device)
    return next((table[key] for gpu, table in PEAK_FLOPS.items() if gpu in name), None)


# The weights that quantize="nf4" stores in NF4: the seven linears of every block (moe.LINEARS),
# never embeddings, norms, the LM head, routers or adapters.
QUANTIZED_KEY = re.compile(r"layers\.\d+\.(attention|feed_forward)\.(%s)\.weight"
                            % "|".join(attr for attr, _ in moe.LINEARS.values()))


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy over targets != ignore_index (0 when there are none, not NaN).

    After the LM head (F.linear) this is the reference for kernels.linear_cross_entropy."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)
