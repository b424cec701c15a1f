"""vLLM plugin for PESC models (Camelidae, Qwen2idae, sparsetral): see the README's Serving section.

vLLM calls register() in every process it starts (the entry point in pyproject.toml), so it must
be cheap and safe to run twice. It teaches transformers the PESC model_types, so that vLLM reads
their config.json without trust_remote_code, and vLLM the architectures that convert.py's export
names (convert.PESC_ARCHITECTURES), by lazy "module:Class" strings that import no model code.
"""


def register():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configs import CONFIG_CLASSES
    from .project.convert import PESC_ARCHITECTURES

    for model_type, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    for arch in PESC_ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, "pesc_vllm.modeling:PESCForCausalLM")
