"""
Convert checkpoints between the official layouts and the project's format (SPEC.md 2, 3).

    python convert.py --src DIR --out DIR [--dtype bf16|fp16|fp32]   # import
    python convert.py --src CKPT --out DIR --to hf                     # export
"""

import re

from model import ModelConfig

# -----------------------------------------------------------------------------
# Hugging Face names <-> project names

# per-layer suffixes: HF -> project
_HF_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "ln1.weight": "attention_norm.weight",  # early Yi checkpoints
    "ln2.weight": "ffn_norm.weight",
    "mlp.moe_adapter.router.weight": "feed_forward.router.weight",
}
_HF_TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_key_to_project(key: str):
    """Map one dense HF Llama/Mistral/Qwen2 key to the project's name; None if it is not one."""
    if key in _HF_TOP_KEYS:
        return _HF_TOP_KEYS[key]
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) in _HF_LAYER_KEYS:
        return f"layers.{m.group(1)}.{_HF_LAYER_KEYS[m.group(2)]}"
    return None


def project_key_to_hf(key: str) -> str:
    """Inverse of hf_key_to_project (standard HF names, never the Yi ln1/ln2 ones)."""
    inverse = {v: k for k, v in _HF_TOP_KEYS.items()}
    if key in inverse:
        return inverse[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    layer_inverse = {v: k for k, v in _HF_LAYER_KEYS.items() if not k.startswith("ln")}
    if m and m.group(2) in layer_inverse:
        return f"model.layers.{m.group(1)}.{layer_inverse[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for project tensor {key!r}")


def hf_rope(hf: dict):
    """(rope_theta, rope_scaling) from an HF config: old keys or transformers 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        scaling.pop("rope_theta", None)
        scaling = None if kind == "default" else {"rope_type": kind, **scaling}
    return float(theta), scaling


def hf_config_to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """The project's ModelConfig for a dense HF Llama / Mistral / Qwen2 config.json."""
    try:
        theta, scaling = hf_rope(hf)
        model_type = hf.get("model_type", "llama")
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window they do not use
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            sliding_window=window,
        )
    except KeyError as e:
        raise KeyError(f"{source}: missing key {e.args[0]!r}") from None
