"""PESC causal LMs for vLLM: vLLM's own Llama model, each FFN output refined by routed adapters.

    out = y + sum_j w_j * s * U_{e_j}( GELU( D_{e_j}(y) ) ),   y = down( silu(gate x) * up x )

Attention, the KV cache and the dense FFN are vLLM's layers, so tensor parallelism and quantized
bases work as for any Llama. The router reads the FFN input x and the adapters the FFN output y
after its all-reduce; both are small and replicated on every tensor-parallel rank. The math is
moe.py's (moe.route, moe.adapter_experts: only the k chosen adapters run for each token), loaded
from the project's files (project/__init__.py). One class serves the three families: vLLM's Llama
layers are Mistral's too, and Qwen2's with configs.Qwen2idaeConfig's qkv_bias.
"""

import functools
import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import is_pp_missing_parameter

from .project import convert, moe


# moe.adapter_experts sorts and counts the (token, expert) pairs, whose sizes depend on the
# routing; as a custom op it is one opaque call to torch.compile and CUDA graphs alike.
@torch.library.custom_op("pesc::adapter_experts", mutates_args=())
def adapter_experts(y: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, down: torch.Tensor,
                    up: torch.Tensor, scaling: float) -> torch.Tensor:
    return moe.adapter_experts(y, weights, experts, down, up, scaling)


@adapter_experts.register_fake
def _(y, weights, experts, down, up, scaling):
    return torch.empty_like(y)


def pesc_config(vllm_config: VllmConfig) -> moe.PESCConfig:
    """The PESC settings of the served config.json, read as convert.py reads them."""
    hf = vllm_config.model_config.hf_config
    path = os.path.join(vllm_config.model_config.model, "config.json")
    try:
        config, _ = convert.hf_model_config(hf.to_dict(), path, ())
    except convert.ConvertError as e:
        raise ValueError(str(e)) from None
    if config.moe is None:
        raise ValueError(f"{path}: architectures names {hf.architectures[0]}, a PESC model, but the config has "
                         f"no PESC settings (num_experts, topk, adapter_dim, moe_scaling)")
    return config.moe


class PESCAdapters(nn.Module):
    """The router and the E adapters of one layer (checkpoint names: mlp.moe_adapter.*)."""

    def __init__(self, hidden_size: int, pesc: moe.PESCConfig, prefix: str = ""):
        super().__init__()
        E, r = pesc.num_experts, pesc.adapter_dim
        self.top_k, self.scaling = pesc.top_k, pesc.adapter_scaling
        self.router = ReplicatedLinear(hidden_size, E, bias=False, quant_config=None, prefix=f"{prefix}.router")
        # stacked as moe.py holds them; the checkpoint's per-expert tensors load into [e]
        self.adapter_down = nn.Parameter(torch.empty(E, r, hidden_size), requires_grad=False)  # D_e
        self.adapter_up = nn.Parameter(torch.empty(E, hidden_size, r), requires_grad=False)  # U_e

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the chosen adapters of y, routed by x; x, y: (tokens, hidden)."""
        logits, _ = self.router(x)  # (tokens, E)
        weights, experts = moe.route(logits, self.top_k)  # (tokens, k)
        return adapter_experts(y, weights, experts, self.adapter_down, self.adapter_up, self.scaling)


class PESCDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with PESC adapters on its FFN's output."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, *, pesc: moe.PESCConfig):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config)
        self.mlp.moe_adapter = PESCAdapters(self.hidden_size, pesc, prefix=f"{prefix}.mlp.moe_adapter")

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)

        x, residual = self.post_attention_layernorm(hidden_states, residual)
        y = self.mlp(x)  # the dense FFN, once per token, all-reduced over tensor-parallel ranks
        return self.mlp.moe_adapter(x, y), residual


class PESCForCausalLM(LlamaForCausalLM):
    """CamelidaeForCausalLM, Qwen2idaeForCausalLM and SparsetralForCausalLM (convert.PESC_ARCHITECTURES)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        pesc = pesc_config(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=functools.partial(PESCDecoderLayer, pesc=pesc))
        self.pesc = pesc

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Dense and router tensors by vLLM's Llama loader (an unknown key is an error that names
        it, a missing one one that names its parameter); each expert's adapter_down/up into its
        slot of the stacked tensors, under either official naming (convert._EXPERT_RE)."""
        params = dict(self.named_parameters())
        E, r, D = self.pesc.num_experts, self.pesc.adapter_dim, self.config.hidden_size
        loaded, naming = {}, {}  # (layer, kind, expert) -> key; the naming the experts use

        def dense_and_router():
            for name, w in weights:
                m = convert._EXPERT_RE.fullmatch(name)
                if m is None:
                    yield name, w
                    continue
                layer, sparsetral, e, kind = int(m.group(1)), not m.group(2), int(m.group(3)), m.group(4)
                target = f"model.layers.{layer}.mlp.moe_adapter.adapter_{kind}"
                if is_pp_missing_parameter(target, self):
                    continue
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r}: the model has no layer {layer}")
                if naming.setdefault("sparsetral", sparsetral) != sparsetral or e >= E or (layer, kind, e) in loaded:
                    raise ValueError(f"checkpoint tensor {name!r} is not an expert of this model (config.json: "
                                     f"num_experts={E}; names like {convert.expert_key(layer, 0, kind, naming['sparsetral'])!r},"
                                     f" each once)")
                want = (r, D) if kind == "down" else (D, r)
                if tuple(w.shape) != want:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(w.shape)}; config.json's "
                                     f"hidden_size={D} and adapter_dim={r} need {want}")
                params[target].data[e].copy_(w)
                loaded[(layer, kind, e)] = name

        done = super().load_weights(dense_and_router())
        for layer in range(self.model.start_layer, self.model.end_layer):
            for kind in ("down", "up"):
                for e in range(E):
                    if (layer, kind, e) not in loaded:
                        raise ValueError(f"the checkpoint has no tensor "
                                         f"{convert.expert_key(layer, e, kind, naming.get('sparsetral', False))!r} "
                                         f"(config.json: num_experts={E})")
                done.add(f"model.layers.{layer}.mlp.moe_adapter.adapter_{kind}")
        return done
