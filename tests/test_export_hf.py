"""The Hugging Face export as the ecosystem reads it: transformers' AutoTokenizer on the exported
tokenizer files gives exactly the ids of the project's tokenizer, for every tokenizer kind and
every chat template (apply_chat_template == Tokenizer.encode_chat), and a PESC export names an
architecture only the vLLM plugin claims.

The tiny PESC exports built here (tiny_pesc_export) are also what serve/tests serves with vLLM.
"""

import json
import os
import shutil

import pytest
import torch

import transformers  # test-only reference (requirements-dev.txt)

from convert import PESC_ARCHITECTURES, ConvertError, convert_checkpoint, export_hf
from model import ModelConfig, Transformer
from moe import PESCConfig, upcycle
from test_tokenizer import MIXED, QWEN_ADDED, package_file, write_tiny_bpe
from tokenizer import TEMPLATES, Tokenizer, write_byte_tokenizer, write_hf_tokenizer, write_tokenizer_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief.  Really."},
     {"role": "user", "content": "Hello, world!  How are\n you?"},
     {"role": "assistant", "content": " Fine,  thanks. 中文 🦙 "},
     {"role": "user", "content": "def f(x):\n    return x ** 2\n\n\tand tabs"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three  "}, {"role": "assistant", "content": "\nfour\n"}],
]


def write_tokenizer(kind, folder):
    """One tokenizer of each kind the project reads, into folder: the real Llama 3 tiktoken file, the
    byte-level demo file, Mistral's SentencePiece model with ChatML's tokens added (sparsetral's),
    and a tiny byte-level BPE with Qwen's three specials right after its vocab."""
    os.makedirs(folder, exist_ok=True)
    if kind == "llama3":
        shutil.copy(package_file("llama_models", "llama3", "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
    elif kind == "byte":
        write_byte_tokenizer(os.path.join(folder, "tokenizer.model"))
    elif kind == "sentencepiece":
        shutil.copy(package_file("mistral_common", "data", "tokenizer.model.v1"), os.path.join(folder, "tokenizer.model"))
        added = {"32000": {"content": "<|im_start|>"}, "32001": {"content": "<|im_end|>"}}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"added_tokens_decoder": added}, f)
    elif kind == "bpe":
        added = {str(267 + i): {"content": name} for i, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
        write_tiny_bpe(folder, config={"added_tokens_decoder": added})
    return Tokenizer(str(folder))


KINDS = ("llama3", "byte", "sentencepiece", "bpe")


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """kind -> (the project's tokenizer, {template: transformers' AutoTokenizer of its export})."""
    out = {}
    for kind in KINDS:
        tok = write_tokenizer(kind, tmp_path_factory.mktemp(kind))
        hf = {}
        for template in TEMPLATES:
            folder = tmp_path_factory.mktemp(f"{kind}-{template}")
            write_hf_tokenizer(tok, str(folder), template)
            hf[template] = transformers.AutoTokenizer.from_pretrained(folder)
        out[kind] = tok, hf
    return out


def chat_ids(hf, messages, add_generation_prompt):
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_ids(kind, hf_tokenizers):
    tok, hf = hf_tokenizers[kind]
    compared = 0
    for template in TEMPLATES:
        for messages in CONVERSATIONS:
            for gen in (True, False):
                if gen and messages[-1]["role"] != "user" and template in ("camelidae", "llama2"):
                    with pytest.raises(ValueError):
                        tok.encode_chat(messages, template, add_generation_prompt=True)
                    with pytest.raises(Exception, match="add_generation_prompt"):
                        chat_ids(hf[template], messages, True)
                    continue
                try:
                    expected = tok.encode_chat(messages, template, add_generation_prompt=gen)[0]
                except KeyError:  # the template's special tokens are not this tokenizer's (chatml on Llama 3)
                    assert kind in ("llama3", "byte") and template == "chatml" or \
                        kind in ("sentencepiece", "bpe") and template == "llama3"
                    continue
                assert chat_ids(hf[template], messages, gen) == expected, (template, messages, gen)
                compared += 1
    assert compared >= 3 * 2 * 2  # three templates apply to every kind


@pytest.mark.parametrize("kind", KINDS)
def test_plain_encode_decode(kind, hf_tokenizers):
    tok, hf = hf_tokenizers[kind]
    hf = hf[tok.template]
    for text in MIXED + ["x  two  spaces", "end with a space ", "ünïcödé façade\u0301"]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), text  # a plain prompt gets the BOS
        assert hf.decode(ids) == tok.decode(ids), text
    g = torch.Generator().manual_seed(0)  # any ids, specials and cut UTF-8 sequences among them
    for _ in range(50):
        ids = torch.randint(0, tok.vocab_size, (12,), generator=g).tolist()
        assert hf.decode(ids) == tok.decode(ids), ids


def test_bad_chat_input(hf_tokenizers):
    tok, hf = hf_tokenizers["byte"]
    for template in ("camelidae", "llama2"):
        bad = [{"role": "assistant", "content": "a"}]
        with pytest.raises(ValueError, match="alternate"):
            tok.encode_chat(bad, template)
        with pytest.raises(Exception, match="alternate"):
            chat_ids(hf[template], bad, False)
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(Exception, match="system only first"):
        chat_ids(hf["llama3"], late_system, False)


# -----------------------------------------------------------------------------
# Tiny PESC exports, one per family: the project's own model, upcycled with non-zero adapters,
# saved, then exported by the real converter.

HEADS = dict(n_heads=2, n_kv_heads=1)  # head_dim 32: vLLM's CPU attention takes 32, 64, 80, ...
FAMILIES = {
    # family: (model preset, overrides, tokenizer kind, chat template, adapter scaling)
    "camelidae": ("tiny", HEADS, "byte", "camelidae", 0.25),
    "qwen2idae": ("tiny-qwen", HEADS, "bpe", "chatml", 0.25),
    "sparsetral": ("tiny", {**HEADS, "rope_theta": 1e6, "sliding_window": 16}, "sentencepiece", "chatml", 1.0),
}
E, TOP_K, R = 4, 2, 8


def tiny_pesc_checkpoint(family, folder, seed=0, dense=False):
    """A project checkpoint of a tiny random PESC model of the family (its vocab its tokenizer's),
    with adapters big enough to change its greedy tokens; dense=True: the same base, no adapters."""
    preset, overrides, kind, template, scaling = FAMILIES[family]
    vocab_size = write_tokenizer(kind, folder).vocab_size
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=vocab_size, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                p.mul_(8)  # sharp attention, so positions and the cache matter
    if not dense:
        upcycle(model, PESCConfig(num_experts=E, top_k=TOP_K, adapter_dim=R, adapter_scaling=scaling,
                                  adapter_dropout=0.0 if family == "sparsetral" else 0.1))
        with torch.no_grad():
            for layer in model.layers:
                layer.feed_forward.adapter_up.normal_(0, 1.0)
    model.eval().save_pretrained(str(folder))  # a new directory: the tokenizer goes in after
    write_tokenizer(kind, folder)
    write_tokenizer_config(str(folder), str(folder), template)
    return str(folder)


def tiny_pesc_export(family, root, seed=0, dense=False):
    """(project checkpoint, HF export) of tiny_pesc_checkpoint, exported by convert.export_hf."""
    ckpt = tiny_pesc_checkpoint(family, os.path.join(root, "ckpt"), seed, dense)
    out = os.path.join(root, "hf")
    export_hf(ckpt, out, family=None if dense else family)
    return ckpt, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pesc_export(family, tmp_path):
    ckpt, out = tiny_pesc_export(family, str(tmp_path))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [PESC_ARCHITECTURES[family]] and config["model_type"] == family
    assert config["topk"] == TOP_K and config["num_experts"] == E and config["adapter_dim"] == R
    assert ("auto_map" in config) == (family != "sparsetral")
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    expert = "experts.0." if family == "sparsetral" else "experts.expert_0."
    assert any(f"mlp.moe_adapter.{expert}adapter_down.weight" in n for n in names)

    # the export's tokenizer: AutoTokenizer renders the project's chat ids, generation stops where sample.py does
    tok = Tokenizer(ckpt)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        assert chat_ids(hf, messages, messages[-1]["role"] == "user") == \
            tok.encode_chat(messages, add_generation_prompt=messages[-1]["role"] == "user")[0]
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == tok.stop_ids
    assert Tokenizer(out).template == tok.template  # the project reads its export's Jinja template back

    # and back in: the same model (RoPE base included: a CamelidaeForCausalLM config's rope_theta is kept)
    back = convert_checkpoint(out, str(tmp_path / "back"))
    assert back == Transformer.from_pretrained(ckpt).config


def test_camelidae_rope_theta_round_trip(tmp_path):
    """Camelidae's quirk (RoPE base 10000) is the official code's; this project's export keeps its theta."""
    ckpt = tiny_pesc_checkpoint("camelidae", str(tmp_path / "ckpt"))
    config = json.load(open(tmp_path / "ckpt" / "config.json"))
    config["rope_theta"] = 5e5
    json.dump(config, open(tmp_path / "ckpt" / "config.json", "w"))
    export_hf(ckpt, str(tmp_path / "hf"))
    assert convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back")).rope_theta == 5e5
    hf = json.load(open(tmp_path / "hf" / "config.json"))
    hf["architectures"] = ["LlamaForCausalLM"]  # as a released Camelidae names it
    json.dump(hf, open(tmp_path / "hf" / "config.json", "w"))
    assert convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "released")).rope_theta == 1e4


def test_export_errors(tmp_path):
    ckpt = tiny_pesc_checkpoint("camelidae", str(tmp_path / "ckpt"))
    with pytest.raises(ConvertError, match="only qwen2idae .* has q/k/v bias"):
        export_hf(ckpt, str(tmp_path / "a"), family="qwen2idae")
    dense = tiny_pesc_checkpoint("camelidae", str(tmp_path / "dense"), dense=True)
    with pytest.raises(ConvertError, match="dense model"):
        export_hf(dense, str(tmp_path / "b"), family="sparsetral")

    # a SentencePiece model that normalises its input has no tokenizer.json that encodes as it does
    import io
    import sentencepiece
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["a llama and a camel"] * 20), model_writer=buf,
                                             vocab_size=30, model_type="bpe", minloglevel=2)  # nmt_nfkc
    os.remove(tmp_path / "ckpt" / "tokenizer.model")
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ConvertError, match=r"tokenizer.model: this SentencePiece model .* 'nmt_nfkc' rule"):
        export_hf(ckpt, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c")
