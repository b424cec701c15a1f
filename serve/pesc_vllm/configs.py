"""transformers config classes for the PESC model_types, so vLLM parses their config.json.

Each is its base's config (Llama, Qwen2, Mistral); the PESC keys (num_experts, topk, adapter_dim,
moe_scaling, adapter_dropout) stay plain attributes, read and checked where the model is built
(modeling.pesc_config, with convert.py's reader). A released checkpoint names the dense class of
its official remote code in `architectures` (LlamaForCausalLM, Qwen2ForCausalLM, ...), which vLLM
would build and fail to load into; its model_type says PESC, so the config names the plugin's
class instead, and for Camelidae takes RoPE base 10000 as the official code computes (as
convert.set_rope_base does on import).
"""

import logging

from transformers import LlamaConfig, MistralConfig, Qwen2Config

from .project.convert import PESC_ARCHITECTURES

logger = logging.getLogger(__name__)  # warnings only: they reach stderr without vLLM's log setup


def _serve_released(config):
    """A released checkpoint's config (architectures not the plugin's): name the plugin's class."""
    arch = PESC_ARCHITECTURES[config.model_type]
    if not config.architectures or config.architectures == [arch]:  # not from a file, or the plugin's
        return
    logger.warning("%s config names %s (the official remote code's class); serving it as %s",
                   config.model_type, config.architectures, arch)
    config.architectures = [arch]
    if config.model_type == "camelidae" and config.rope_parameters.get("rope_theta") != 10000.0:
        logger.warning("Camelidae: the official code ignores rope_theta (%s) and uses 10000; so does this",
                       config.rope_parameters.get("rope_theta"))
        config.rope_parameters["rope_theta"] = 10000.0


class CamelidaeConfig(LlamaConfig):
    model_type = "camelidae"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _serve_released(self)


class Qwen2idaeConfig(Qwen2Config):
    model_type = "qwen2idae"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # vLLM's Llama layers serve every family (modeling.py); they take q/k/v bias without an
        # o bias from this attribute, which is Qwen2's attention
        self.qkv_bias = True
        _serve_released(self)


class SparsetralConfig(MistralConfig):
    model_type = "sparsetral"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _serve_released(self)


CONFIG_CLASSES = {c.model_type: c for c in (CamelidaeConfig, Qwen2idaeConfig, SparsetralConfig)}
assert set(CONFIG_CLASSES) == set(PESC_ARCHITECTURES)
