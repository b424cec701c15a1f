"""convert.py: every import layout against a reference model, round trips, export, bad input.

Each test writes a tiny random checkpoint in an official layout, converts it (with the real CLI
at least once per layout family) and compares the project model's logits with the reference:
transformers' own model for dense checkpoints (Meta ones are written from an HF model in
Meta's order and sharding), and for PESC checkpoints the PESC paper's layer math written out
below on the original per-expert tensors. Tolerance: tests/tolerance.py's fp32 rule for a whole
model (a few 1e-6 on these logits). The two implementations sum in different orders and differ
by ~3e-7 here; the mistakes a converter makes (a q/k permutation with the wrong head count, a
lost sliding window, experts out of order, RoPE scaling left out) move these logits by 4e-3 to
0.5, far above it.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import transformers  # test-only reference (requirements-dev.txt)

from convert import ConvertError, convert_checkpoint, export_hf, hf_model_config
from model import ModelConfig, Transformer, rope_inv_freq
from moe import LoRAConfig, PESCConfig, add_lora, merge_lora, upcycle
from tokenizer import Tokenizer, byte_to_unicode, write_byte_tokenizer
from tolerance import assert_close, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, DIM, N_HEADS, N_KV = 512, 64, 4, 2  # GQA everywhere: k has half the heads of q
BASE = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=120, num_hidden_layers=2,
            num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=128)


# -----------------------------------------------------------------------------
# helpers


def run_cli(*args):
    """`python convert.py ARGS` in a subprocess, exactly as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def hf_model(kind, **extra):
    """A tiny random transformers model (kind: Llama, Mistral, Qwen2), eval mode, eager attention."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # HF initialises them trivially; make them count
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                # at init (std 0.02) attention is near uniform and positions hardly matter;
                # sharp attention makes a wrong RoPE or q/k row order show in the logits
                p.mul_(8)
    return model


def hf_state(model):
    """The model's tensors as HF files hold them, each with its own storage."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_safetensors(state, folder, name="model.safetensors"):
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, name), metadata={"format": "pt"})


def save_bin(state, folder, n_shards):
    """pytorch_model*.bin (+ index) as transformers 4 wrote them; transformers 5 only writes safetensors."""
    os.makedirs(folder, exist_ok=True)
    if n_shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        chunk = keys[i * per:(i + 1) * per]
        torch.save({k: state[k] for k in chunk}, os.path.join(folder, name))
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(folder, "pytorch_model.bin.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_hf_files(folder):
    """Every tensor of an HF checkpoint folder, read with safetensors / torch.load directly."""
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
        elif name.endswith(".bin"):
            state.update(torch.load(os.path.join(folder, name), weights_only=True))
    return state


def project_logits(ckpt, idx, positions=None):
    model = Transformer.from_pretrained(ckpt).eval()
    with torch.no_grad():
        return model(idx, positions=positions)[0]


def reference_logits(hf, idx, positions=None):
    with torch.no_grad():
        return hf(input_ids=idx, position_ids=positions).logits


def logits_reduction(hf):
    """The reduction length (tolerance.py) of a whole model: its FFN's dot, once per layer."""
    return hf.config.intermediate_size * hf.config.num_hidden_layers


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_nothing_left(parent, expected):
    """Only the expected entries are in parent: no output, no temporary directory."""
    assert sorted(os.listdir(parent)) == sorted(expected)


def write_sentencepiece(path):
    """A tiny SentencePiece model (Llama 2 / Mistral / Yi tokenizers are SentencePiece), with their
    settings: BPE, no normalisation, spaces kept as they are."""
    import sentencepiece  # here: the GPU machine runs this file's device test without it

    text = ["the quick brown fox jumps over the lazy dog", "a llama, a camel and a mixture of experts"] * 20
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=60,
                                             model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                             normalization_rule_name="identity", remove_extra_whitespaces=False,
                                             minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_byte_bpe(folder):
    """A byte-level BPE vocab.json + merges.txt (Qwen's kind of tokenizer) with no merges."""
    table = byte_to_unicode()
    write_json(os.path.join(folder, "vocab.json"), {table[b]: b for b in range(256)})
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def hf_name(key):
    """The standard HF name of a key as convert's export writes it (Yi norms, sparsetral experts)."""
    key = key.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm.")
    parts = key.split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        i = parts.index("experts") + 1
        parts[i] = f"expert_{parts[i]}"
    return ".".join(parts)


def assert_same_tensors(original, exported, tied):
    """Export gives back the original tensors bit for bit, under the standard names."""
    original = {hf_name(k): v for k, v in original.items() if not (tied and k == "lm_head.weight")}
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k


# -----------------------------------------------------------------------------
# Hugging Face dense checkpoints


def write_hf_dense(case, folder):
    """Write an HF checkpoint for one test case; return the reference transformers model."""
    if case == "llama-sharded-safetensors":
        hf = hf_model("Llama", rope_theta=5e5)
        hf.save_pretrained(folder, max_shard_size="100KB")
        write_sentencepiece(os.path.join(folder, "tokenizer.model"))
    elif case == "mistral-window-bin-shards":
        hf = hf_model("Mistral", sliding_window=16, rope_theta=1e6, head_dim=16)
        hf.save_pretrained(folder)
        os.remove(os.path.join(folder, "model.safetensors"))
        save_bin(hf_state(hf), folder, n_shards=3)
    elif case == "yi-ln1-ln2":  # early Yi: model_type "Yi", norms named ln1 / ln2
        hf = hf_model("Llama", rope_theta=5e6)
        hf.save_pretrained(folder)
        state = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2"): v
                 for k, v in hf_state(hf).items()}
        save_safetensors(state, folder)
        cfg = read_json(os.path.join(folder, "config.json"))
        write_json(os.path.join(folder, "config.json"), {**cfg, "model_type": "Yi", "architectures": ["YiForCausalLM"]})
    elif case == "qwen2-tied":  # transformers leaves lm_head.weight out of tied checkpoints
        hf = hf_model("Qwen2", tie_word_embeddings=True, rope_theta=1e6)
        hf.save_pretrained(folder)
        write_byte_bpe(folder)
    elif case == "qwen2-tied-lm-head-bin":  # ... older files keep it: one .bin holding both
        hf = hf_model("Qwen2", tie_word_embeddings=True)
        hf.save_pretrained(folder)
        os.remove(os.path.join(folder, "model.safetensors"))
        state = hf_state(hf)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_bin(state, folder, n_shards=1)
    return hf


DENSE = ["llama-sharded-safetensors", "mistral-window-bin-shards", "yi-ln1-ln2", "qwen2-tied", "qwen2-tied-lm-head-bin"]


@pytest.mark.parametrize("case", DENSE)
def test_hf_dense_import_export(case, tmp_path):
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    hf = write_hf_dense(case, src)
    original = read_hf_files(src)
    if case == DENSE[0]:  # the real CLI, once for this layout family
        r = run_cli("--ckpt", src, "--out_dir", out)
        assert r.returncode == 0, r.stderr
        assert "[1/" in r.stdout  # progress per input shard
    else:
        convert_checkpoint(src, out)

    T = 40  # longer than Mistral's 16-token window, so the window bites
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf, idx)
    assert_close(project_logits(out, idx), ref, reduction=logits_reduction(hf))

    config = ModelConfig.from_dict(read_json(out / "config.json"))
    assert config.n_kv_heads == N_KV and config.moe is None
    assert config.sliding_window == (16 if case.startswith("mistral") else None)
    assert config.qkv_bias == config.tie_embeddings == case.startswith("qwen2")
    template = read_json(out / "tokenizer_config.json")["chat_template"]
    assert template == ("chatml" if case.startswith("qwen2") else "llama2")
    if case in ("llama-sharded-safetensors", "qwen2-tied"):  # the copied tokenizer loads
        assert Tokenizer(str(out)).kind == ("sentencepiece" if case.startswith("llama") else "bpe")

    # export: the same tensors bit for bit, and transformers loads it with no custom code
    if case == DENSE[0]:
        r = run_cli("--ckpt", out, "--out_dir", back, "--to", "hf")
        assert r.returncode == 0, r.stderr
    else:
        export_hf(out, back, max_shard_bytes=100_000)  # sharded, with an index
        assert (back / "model.safetensors.index.json").exists()
    assert_same_tensors(original, read_hf_files(back), tied=config.tie_embeddings)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(hf).__name__
    # identical weights through the identical transformers code: identical logits
    assert torch.equal(reference_logits(reloaded, idx), ref)


# -----------------------------------------------------------------------------
# Meta consolidated checkpoints


def hf_to_meta_rows(w, n_heads):
    """HF's q/k row order -> Meta's, per head (the rotate-halves vs interleaved RoPE layouts; the converter
    does the inverse)."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


META_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
              "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}
# Meta's model-parallel split dims (ColumnParallel 0, RowParallel 1; norms replicated)
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_state(hf):
    """An HF Llama's tensors under Meta's names, q/k rows in Meta's interleaved order."""
    state = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
             "output.weight": hf.lm_head.weight}
    for i, layer in enumerate(hf.model.layers):
        for hf_part, meta_part in META_NAMES.items():
            state[f"layers.{i}.{meta_part}.weight"] = layer.get_submodule(hf_part).weight
        state[f"layers.{i}.attention.wq.weight"] = hf_to_meta_rows(layer.self_attn.q_proj.weight, N_HEADS)
        state[f"layers.{i}.attention.wk.weight"] = hf_to_meta_rows(layer.self_attn.k_proj.weight, N_KV)
    return {k: v.detach().clone() for k, v in state.items()}


def write_meta(folder, hf, params, n_shards, embedding_split_dim):
    """consolidated.NN.pth shards as Meta's model-parallel code saves them, + params.json."""
    os.makedirs(folder, exist_ok=True)
    state = meta_state(hf)
    hd = DIM // N_HEADS
    shards = [{"rope.freqs": 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)} for _ in range(n_shards)]
    for key, t in state.items():
        kind = key.split(".")[-2]
        d = embedding_split_dim if kind == "tok_embeddings" else META_SPLIT.get(kind)
        pieces = [t] * n_shards if d is None else t.chunk(n_shards, dim=d)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f"consolidated.{i:02d}.pth"))
    write_json(os.path.join(folder, "params.json"), params)


def attention_scores(wq, wk, x, theta, interleaved):
    """q.k scores of one layer under Meta's interleaved RoPE (complex pairs) or HF's halves.

    An independent reading of the two official layouts (the oracle for the Meta q/k row order),
    not a twin of model.apply_rope."""
    T, hd = x.shape[0], DIM // N_HEADS
    angles = torch.outer(torch.arange(T).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))

    def rope(w, n):
        h = (x @ w.T).view(T, n, hd)
        if interleaved:  # Meta: (h[2i], h[2i+1]) is one complex number
            rot = torch.polar(torch.ones_like(angles), angles)[:, None]
            return torch.view_as_real(torch.view_as_complex(h.reshape(T, n, hd // 2, 2)) * rot).reshape(T, n, hd)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        h1, h2 = h[..., :hd // 2], h[..., hd // 2:]
        return torch.cat([h1 * cos - h2 * sin, h2 * cos + h1 * sin], dim=-1)

    q, k = rope(wq, N_HEADS), rope(wk, N_KV).repeat_interleave(N_HEADS // N_KV, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
META = {
    # Llama 2: vocab_size -1, embedding split along dim 1, SentencePiece tokenizer
    "llama2": dict(params=dict(dim=DIM, n_layers=2, n_heads=N_HEADS, n_kv_heads=N_KV, vocab_size=-1, multiple_of=32,
                               norm_eps=1e-5),
                   hf=dict(intermediate_size=192, rms_norm_eps=1e-5), split=1),
    # Llama 3.1: ffn_dim_multiplier, use_scaled_rope, embedding split along dim 0, tiktoken tokenizer
    "llama3.1": dict(params=dict(dim=DIM, n_layers=2, n_heads=N_HEADS, n_kv_heads=N_KV, vocab_size=VOCAB, multiple_of=32,
                                 ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=5e5, use_scaled_rope=True),
                     hf=dict(intermediate_size=224, rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE),
                             max_position_embeddings=131072), split=0),
}


@pytest.mark.parametrize("case", list(META))
def test_meta_import(case, tmp_path):
    spec = META[case]
    src, out = tmp_path / "src", tmp_path / "out"
    hf = hf_model("Llama", **spec["hf"])
    write_meta(src, hf, spec["params"], n_shards=2, embedding_split_dim=spec["split"])
    if case == "llama2":
        write_sentencepiece(os.path.join(src, "tokenizer.model"))
        r = run_cli("--ckpt", src, "--out_dir", out)
        assert r.returncode == 0, r.stderr
        assert "[1/2] consolidated.00.pth" in r.stdout and "[2/2] consolidated.01.pth" in r.stdout
    else:
        write_byte_tokenizer(os.path.join(src, "tokenizer.model"))
        convert_checkpoint(src, out)

    # the shards really are in Meta's order: Meta's interleaved RoPE on them gives HF's scores
    x = torch.randn(6, DIM)
    shards = [torch.load(src / f"consolidated.0{i}.pth", weights_only=True) for i in (0, 1)]
    wq, wk = (torch.cat([s[f"layers.0.attention.{w}.weight"] for s in shards]) for w in ("wq", "wk"))
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():
        meta = attention_scores(wq, wk, x, 1e4, interleaved=True)
        ref = attention_scores(attn.q_proj.weight, attn.k_proj.weight, x, 1e4, interleaved=False)
    assert_close(meta, ref, reduction=DIM)  # q and k sum DIM products, the scores head_dim

    # far-out positions, where Llama 3.1's RoPE scaling changes the low frequencies a lot
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6000, 6040)[None].expand(2, -1)
    ref = reference_logits(hf, idx, positions)
    logits = project_logits(out, idx, positions)
    assert_close(logits, ref, reduction=logits_reduction(hf))

    # and on to transformers: Meta -> project -> HF gives the reference model's logits
    export_hf(out, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert_close(reference_logits(reloaded, idx, positions), ref, reduction=logits_reduction(hf))

    config = ModelConfig.from_dict(read_json(out / "config.json"))
    assert (config.vocab_size, config.n_kv_heads, config.ffn_dim) == (VOCAB, N_KV, spec["hf"]["intermediate_size"])
    tok = Tokenizer(str(out))
    if case == "llama3.1":
        assert config.rope_scaling == LLAMA3_ROPE and config.rope_theta == 5e5
        assert tok.kind == "tiktoken" and tok.template == "llama3"
        # the scaling really changes these logits, so the comparison above checked it
        model = Transformer.from_pretrained(out).eval()
        model.config.rope_scaling = None
        model.inv_freq = rope_inv_freq(model.config)
        with torch.no_grad():
            assert max_diff(model(idx, positions=positions)[0], logits) > 100 * tolerance(
                logits, reduction=logits_reduction(hf))
    else:
        assert config.rope_scaling is None and config.rope_theta == 1e4
        assert tok.kind == "sentencepiece" and tok.template == "llama2"


# -----------------------------------------------------------------------------
# Official PESC checkpoints


class PESCReference(torch.nn.Module):
    """The PESC layer as the paper defines it, on the official per-expert tensors, replacing one HF layer's MLP.

    out = y + sum over the top-k experts of w_e * s * U_e(GELU(D_e(y))), y the dense FFN output,
    w = softmax over the k largest router logits of the FFN input x (eval: no dropout).

    Not a twin of moe.py: an independent reading of the official Camelidae format, the oracle
    the converter is checked against. It works on the official per-expert tensors and runs every
    expert on every token (moe.py stacks them and dispatches), so a mistake shared with moe.py,
    such as experts out of order, cannot hide."""

    def __init__(self, mlp, router, downs, ups, top_k, scaling):
        super().__init__()
        self.mlp, self.router, self.downs, self.ups = mlp, router, downs, ups
        self.top_k, self.scaling = top_k, scaling

    def forward(self, x):
        y = self.mlp(x)  # (B, T, D)
        top, chosen = (x @ self.router.T).topk(self.top_k, dim=-1)  # (B, T, k)
        w = torch.softmax(top, dim=-1)
        out = y
        for e, (down, up) in enumerate(zip(self.downs, self.ups)):
            a = self.scaling * (F.gelu(y @ down.T) @ up.T)  # expert e on every token
            weight = (w * (chosen == e)).sum(-1, keepdim=True)  # its routing weight, 0 if not chosen
            out = out + weight * a
        return out


def add_pesc_reference(hf, tensors, E, top_k, scaling, sparsetral=False):
    """Put PESCReference into every layer of hf, reading official tensor names from tensors."""
    for i, layer in enumerate(hf.model.layers):
        p = f"model.layers.{i}.mlp.moe_adapter."
        names = [str(e) if sparsetral else f"expert_{e}" for e in range(E)]
        layer.mlp = PESCReference(layer.mlp, tensors[p + "router.weight"],
                                  [tensors[f"{p}experts.{n}.adapter_down.weight"] for n in names],
                                  [tensors[f"{p}experts.{n}.adapter_up.weight"] for n in names], top_k, scaling)
    return hf


E, TOP_K, R = 4, 2, 8
PESC = {
    # Camelidae: Llama base, .bin shards, config says rope_theta 5e6 (a Yi base) but the official
    # code computes with 10000: the reference model uses 10000
    "camelidae": dict(kind="Llama", hf=dict(rope_theta=1e4), theta_in_config=5e6, top_k=2, scaling=0.25),
    # Qwen2idae: q/k/v bias, honours rope_theta, Qwen's unused sliding_window in the config
    "qwen2idae": dict(kind="Qwen2", hf=dict(rope_theta=1e6), theta_in_config=1e6, top_k=2, scaling=0.25),
    # sparsetral: Mistral base with a sliding window, "experts.{e}" names, adapter_dropout key
    "sparsetral": dict(kind="Mistral", hf=dict(rope_theta=1e6, sliding_window=16, head_dim=16), theta_in_config=1e6,
                       top_k=3, scaling=1.0),
}


def write_pesc(case, folder):
    """An official-style PESC checkpoint with non-zero adapters; returns (reference model, tensors)."""
    spec = PESC[case]
    hf = hf_model(spec["kind"], **spec["hf"])
    state = hf_state(hf)
    g = torch.Generator().manual_seed(2)
    for i in range(BASE["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.moe_adapter."
        state[p + "router.weight"] = torch.randn(E, DIM, generator=g)
        for e in range(E):
            name = str(e) if case == "sparsetral" else f"expert_{e}"
            # large enough that the adapters move the logits well beyond the tolerance
            state[f"{p}experts.{name}.adapter_down.weight"] = torch.randn(R, DIM, generator=g) / DIM ** 0.5
            state[f"{p}experts.{name}.adapter_up.weight"] = torch.randn(DIM, R, generator=g) / R ** 0.5
    if case == "camelidae":  # Camelidae-8x7B ships .bin shards
        save_bin(state, folder, n_shards=2)
    else:
        save_safetensors(state, folder)
    config = {  # the keys the official config.json files carry (transformers 4 style)
        "architectures": [f"{spec['kind']}ForCausalLM"], "model_type": case, "hidden_act": "silu",
        "hidden_size": DIM, "intermediate_size": BASE["intermediate_size"], "num_hidden_layers": 2,
        "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV, "vocab_size": VOCAB,
        "max_position_embeddings": 128, "rms_norm_eps": hf.config.rms_norm_eps, "rope_theta": spec["theta_in_config"],
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "num_experts": E, "topk": spec["top_k"], "adapter_dim": R, "moe_scaling": spec["scaling"],
        "moe_dtype": "bfloat16", "output_router_logits": False,
    }
    if case == "qwen2idae":
        config.update(use_sliding_window=False, sliding_window=32768, max_window_layers=28)
    if case == "sparsetral":
        config.update(sliding_window=16, head_dim=16, adapter_dropout=0.0)
    write_json(os.path.join(folder, "config.json"), config)
    write_byte_tokenizer(os.path.join(folder, "tokenizer.model"))
    add_pesc_reference(hf, state, E, spec["top_k"], spec["scaling"], sparsetral=case == "sparsetral")
    return hf, state


@pytest.mark.parametrize("case", list(PESC))
def test_pesc_import_export(case, tmp_path):
    spec = PESC[case]
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    hf, original = write_pesc(case, src)
    if case == "camelidae":
        r = run_cli("--ckpt", src, "--out_dir", out)
        assert r.returncode == 0, r.stderr
        assert "10000" in r.stdout and "rope_theta" in r.stdout  # the quirk is announced
    else:
        convert_checkpoint(src, out)

    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf, idx)
    dense = hf_model(spec["kind"], **spec["hf"])  # the same base without adapters
    assert max_diff(reference_logits(dense, idx), ref) > 100 * tolerance(ref, reduction=logits_reduction(hf))  # the adapters matter
    assert_close(project_logits(out, idx), ref, reduction=logits_reduction(hf))

    config = ModelConfig.from_dict(read_json(out / "config.json"))
    assert config.moe == PESCConfig(num_experts=E, top_k=spec["top_k"], adapter_dim=R, adapter_scaling=spec["scaling"],
                                    adapter_dropout=0.0 if case == "sparsetral" else 0.1)
    assert config.rope_theta == (1e4 if case == "camelidae" else 1e6)
    assert config.qkv_bias == (case == "qwen2idae")
    assert config.sliding_window == (16 if case == "sparsetral" else None)
    assert read_json(out / "tokenizer_config.json")["chat_template"] == ("camelidae" if case == "camelidae" else "chatml")

    # export: Camelidae-style names and config, the original tensors bit for bit
    export_hf(out, back)
    assert_same_tensors(original, read_hf_files(back), tied=False)
    exported = read_json(back / "config.json")
    family = "qwen2idae" if case == "qwen2idae" else "camelidae"
    assert exported["model_type"] == family
    assert exported["auto_map"]["AutoModelForCausalLM"] == \
        f"modeling_{family}.{'Qwen2ForCausalLM' if family == 'qwen2idae' else 'LlamaForCausalLM'}"
    assert {k: exported[k] for k in ("num_experts", "topk", "adapter_dim", "moe_scaling", "adapter_dropout")} == \
        dict(num_experts=E, topk=spec["top_k"], adapter_dim=R, moe_scaling=spec["scaling"],
             adapter_dropout=0.0 if case == "sparsetral" else 0.1)


def test_camelidae_rope_theta_override(tmp_path):
    src = tmp_path / "src"
    write_pesc("camelidae", src)
    config = convert_checkpoint(src, tmp_path / "out", rope_theta=5e6)
    assert config.rope_theta == 5e6
    assert read_json(tmp_path / "out" / "config.json")["rope_theta"] == 5e6


def test_export_merges_lora(tmp_path):
    """A PESC checkpoint with LoRA exports merged; the PESC reference on the exported files gives its logits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    add_lora(upcycle(model, PESCConfig(num_experts=E, top_k=TOP_K, adapter_dim=R)), LoRAConfig(rank=4))
    with torch.no_grad():  # trained-looking: adapters and LoRA away from their zero init
        for name, p in model.named_parameters():
            if "adapter_up" in name or "lora_b" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx)[0]

    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    tensors = read_hf_files(tmp_path / "hf")
    assert not [k for k in tensors if "lora" in k]
    merged = merge_lora(model).state_dict()
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], merged["layers.1.attention.wk.weight"])

    cfg = read_json(tmp_path / "hf" / "config.json")
    assert cfg["model_type"] == "camelidae" and cfg["num_experts"] == E and cfg["topk"] == TOP_K
    hf_cfg = transformers.LlamaConfig(**{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "tie_word_embeddings")})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k: v for k, v in tensors.items() if "moe_adapter" not in k}, strict=True)
    add_pesc_reference(hf, tensors, E, cfg["topk"], cfg["moe_scaling"])
    assert_close(reference_logits(hf, idx), expected, reduction=logits_reduction(hf))


# -----------------------------------------------------------------------------
# Bad input: a clear error naming the file and the key, nothing left under --out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One good source per layout family, copied and broken by each bad-input case."""
    root = tmp_path_factory.mktemp("good")
    write_hf_dense("llama-sharded-safetensors", root / "hf")
    write_hf_dense("qwen2-tied-lm-head-bin", root / "qwen")
    write_meta(root / "meta", hf_model("Llama", **META["llama3.1"]["hf"]), META["llama3.1"]["params"], 2, 0)
    write_pesc("qwen2idae", root / "pesc")
    return root


def edit_json(path, **changes):
    d = read_json(path)
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del d[k]
    write_json(path, d)


def edit_safetensors(path, edit):
    state = load_file(path)
    edit(state)
    save_safetensors(state, os.path.dirname(path), os.path.basename(path))


def edit_pth(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def first_shard(folder):
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("model-"))[0])


BAD = {
    # name: (source, how to break it, what the error must say)
    "unknown layout": ("hf", lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d) if f != "tokenizer.model"],
                       r"unknown checkpoint layout"),
    "config.json not JSON": ("hf", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"),
                             r"config.json: not valid JSON"),
    "unsupported model_type": ("hf", lambda d: edit_json(os.path.join(d, "config.json"), model_type="gemma"),
                               r"config.json: model_type 'gemma'"),
    "missing HF shard": ("hf", lambda d: os.remove(first_shard(d)),
                         r"model.safetensors.index.json: shard model-00001-of-\d+.safetensors .*missing"),
    "unknown HF key": ("hf", lambda d: edit_safetensors(first_shard(d), lambda s: s.update(
                           {"model.layers.0.mlp.extra_proj.weight": torch.zeros(3)})),
                       r"model-00001-of-\d+.safetensors: unknown tensor 'model.layers.0.mlp.extra_proj.weight'"),
    "key missing from its shard": ("hf", lambda d: edit_safetensors(first_shard(d), lambda s: s.pop(sorted(s)[0])),
                                   r"model-00001-of-\d+.safetensors: no tensor '[a-z_.0-9]+', which .*index.json places"),
    "shape vs config.json": ("hf", lambda d: edit_json(os.path.join(d, "config.json"), intermediate_size=128),
                             r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape .*config.json implies"),
    "more layers than config.json": ("hf", lambda d: edit_json(os.path.join(d, "config.json"), num_hidden_layers=1),
                                     r"tensor 'model.layers.1.[a-z_.]+' has no place in the model .*config.json"),
    "fewer layers than config.json": ("hf", lambda d: edit_json(os.path.join(d, "config.json"), num_hidden_layers=3),
                                      r"no tensor 'model.layers.2.[a-z_.]+'.* which .*config.json requires"),
    "tied but lm_head differs": ("qwen", lambda d: edit_pth(os.path.join(d, "pytorch_model.bin"), lambda s: s.update(
                                     {"lm_head.weight": s["lm_head.weight"] + 1})),
                                 r"pytorch_model.bin: 'lm_head.weight' differs .*tie_word_embeddings"),
    "missing Meta shard": ("meta", lambda d: os.remove(os.path.join(d, "consolidated.00.pth")),
                           r"consolidated.00.pth: shard missing"),
    "params.json FFN size": ("meta", lambda d: edit_json(os.path.join(d, "params.json"), ffn_dim_multiplier=1.5),
                             r"params.json: .*FFN size of 256, but 'layers.0.feed_forward.w1.weight' has 224 rows"),
    "params.json vocab_size": ("meta", lambda d: edit_json(os.path.join(d, "params.json"), vocab_size=500),
                               r"params.json: vocab_size=500, but 'tok_embeddings.weight' has 512 rows"),
    "params.json n_layers": ("meta", lambda d: edit_json(os.path.join(d, "params.json"), n_layers=3),
                             r"no tensor 'layers.2.[a-z_.0-9]+'.* which .*params.json requires"),
    "unknown Meta key": ("meta", lambda d: [edit_pth(os.path.join(d, f"consolidated.0{i}.pth"), lambda s: s.update(
                             {"layers.0.attention.extra.weight": torch.zeros(3)})) for i in (0, 1)],
                         r"tensor 'layers.0.attention.extra.weight' has no place in the model .*params.json"),
    "fewer experts than config.json": ("pesc", lambda d: edit_json(os.path.join(d, "config.json"), num_experts=5),
                                       r"model.safetensors: tensor 'model.layers.0.mlp.moe_adapter.router.weight' "
                                       r"has shape \(4, 64\), .*config.json implies \(5, 64\)"),
    "more experts than config.json": ("pesc", lambda d: edit_json(os.path.join(d, "config.json"), num_experts=3),
                                      r"model.safetensors: tensor 'model.layers.0.mlp.moe_adapter.experts.expert_3."
                                      r"adapter_(down|up).weight' is not an expert"),
    "adapter_dim vs tensors": ("pesc", lambda d: edit_json(os.path.join(d, "config.json"), adapter_dim=16),
                               r"tensor 'model.layers.0.mlp.moe_adapter.experts.\*.adapter_(down|up).weight' "
                               r"has shape .*config.json implies"),
    "PESC config without topk": ("pesc", lambda d: edit_json(os.path.join(d, "config.json"), topk=None),
                                 r"config.json: PESC checkpoint without 'topk'"),
    "an expert missing": ("pesc", lambda d: edit_safetensors(os.path.join(d, "model.safetensors"), lambda s: s.pop(
                              "model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight")),
                          r"no tensor 'model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, good, tmp_path):
    source, breaks, message = BAD[case]
    src = tmp_path / "src"
    shutil.copytree(good / source, src)
    breaks(str(src))
    with pytest.raises(ConvertError, match=message):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, ["src"])


def test_cli_errors(good, tmp_path):
    # an expected error is one line on stderr, exit status 1, no traceback, nothing written
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a checkpoint")
    r = run_cli("--ckpt", tmp_path / "junk", "--out_dir", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "unknown checkpoint layout" in r.stderr
    assert "Traceback" not in r.stderr
    assert_nothing_left(tmp_path, ["junk"])

    # an existing --out is never replaced without --force
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="exists; pass --force"):
        convert_checkpoint(good / "hf", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    with pytest.raises(ConvertError, match="is the source checkpoint itself"):
        convert_checkpoint(good / "hf", good / "hf", force=True)  # nor, even with --force, the source
    convert_checkpoint(good / "hf", tmp_path / "out", force=True)
    assert "keep.txt" not in os.listdir(tmp_path / "out")
    assert_nothing_left(tmp_path, ["junk", "out"])

    # a failure with --force keeps the old output intact
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(ConvertError, match="unknown checkpoint layout"):
        convert_checkpoint(tmp_path / "junk", tmp_path / "out", force=True)
    assert sorted(os.listdir(tmp_path / "out")) == before
    assert_nothing_left(tmp_path, ["junk", "out"])


def test_dtype_and_tokenizer_files(good, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good / "hf", src)
    os.remove(src / "tokenizer.model")
    convert_checkpoint(src, tmp_path / "a", dtype="bf16")
    assert "warning: no tokenizer" in capsys.readouterr().err
    model = Transformer.from_pretrained(tmp_path / "a")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConvertError, match="fp8"):
        convert_checkpoint(src, tmp_path / "b", dtype="fp8")

    # an HF Llama 3 repo keeps Meta's tiktoken file under original/; it becomes tokenizer.model
    os.mkdir(src / "original")
    write_byte_tokenizer(str(src / "original" / "tokenizer.model"))
    convert_checkpoint(src, tmp_path / "c")
    assert "warning" not in capsys.readouterr().err
    assert Tokenizer(str(tmp_path / "c")).template == "llama3"


def test_old_option_names_still_work_with_a_note(good, tmp_path, capsys):
    import convert

    convert.main(["--src", str(good / "hf"), "--out", str(tmp_path / "a"), "--dtype", "bfloat16"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --src is now --ckpt", "note: --out is now --out_dir",
                     "note: --dtype bfloat16 is now spelled bf16"]
    assert {p.dtype for p in Transformer.from_pretrained(tmp_path / "a").parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("model_type,expert,family", [
    ("llama", "expert_0", "camelidae"), ("qwen2", "expert_0", "qwen2idae"), ("mistral", "0", "sparsetral"),
    ("camelidae", "expert_0", "camelidae"), ("sparsetral", "0", "sparsetral")])
def test_pesc_family_from_keys(model_type, expert, family):
    # released configs may name the base's model_type; the expert key names tell sparsetral apart
    hf = {**BASE, "model_type": model_type, "num_experts": 2, "topk": 1, "adapter_dim": 4, "moe_scaling": 0.5}
    keys = [f"model.layers.0.mlp.moe_adapter.experts.{expert}.adapter_down.weight"]
    config, found = hf_model_config(hf, "config.json", keys)
    assert found == family
    assert config.moe.adapter_dropout == (0.0 if family == "sparsetral" else 0.1)
    assert config.qkv_bias == (family == "qwen2idae")
    assert config.rope_theta == 10000.0


# -----------------------------------------------------------------------------
# A converted checkpoint in bf16 on the test device (PESC_TEST_DEVICE=cuda on a GPU: bench.py --gpu)


def converted_in_bf16(tmp_path):
    """A tiny PESC model whose adapters move the logits by more than bf16's rounding, exported
    Camelidae-style and imported back in bf16 by the real converter: (model, converted, its config)."""
    torch.manual_seed(0)
    # top_k = num_experts: no expert choice to flip when bf16 rounding meets a near tie between
    # the k-th expert and the next (one token's logits would then move by an adapter's worth)
    cfg = ModelConfig.from_preset("tiny", moe=PESCConfig(num_experts=4, top_k=4, adapter_dim=16, adapter_dropout=0.0))
    net = Transformer(cfg).eval().requires_grad_(False).cpu()
    net.tok_embeddings.weight.normal_(0, 0.1)  # small beside the blocks' outputs and the adapters
    for ff in net.layers:
        ff.feed_forward.adapter_down.mul_(3)
        ff.feed_forward.adapter_up.normal_(0, cfg.moe.adapter_dim ** -0.5)  # about unit gain
    net.save_pretrained(tmp_path / "project")
    export_hf(tmp_path / "project", tmp_path / "hf")
    config = convert_checkpoint(tmp_path / "hf", tmp_path / "back", dtype="bf16")
    return net, Transformer.from_pretrained(tmp_path / "back"), config


def test_converted_pesc_in_bf16_on_the_device(tmp_path, monkeypatch):
    import convert

    net, back, config = converted_in_bf16(tmp_path)
    assert config == net.config
    expected_state = {k: t.to(torch.bfloat16) for k, t in net.state_dict().items()}
    got_state = back.state_dict()
    assert got_state.keys() == expected_state.keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected_state[k]) for k, t in got_state.items())
    idx = torch.randint(0, config.vocab_size, (2, 64), device="cpu")
    device = torch.empty(0).device  # the tests' default device (conftest: PESC_TEST_DEVICE)
    with torch.no_grad():
        expected = net(idx)[0]
        try:
            got = back.to(device)(idx.to(device))[0].float().cpu()
        except RuntimeError as e:  # oneDNN's bf16 matmuls on some CPUs without AVX-512
            if device.type == "cpu" and "avx512" in str(e).lower():
                pytest.skip(f"this CPU has no bf16 matmul: {e}")
            raise
        no_adapters = Transformer.from_pretrained(tmp_path / "project").eval()
        for layer in no_adapters.layers:
            layer.feed_forward.adapter_up.zero_()
        adapter_effect = (no_adapters(idx)[0] - expected).abs().max()
    # bf16 weights and activations, sums in fp32: a few bf16 roundings per element in every
    # layer, the layers adding their errors (tolerance.py's rule: 8 ulps, reduction n_layers)
    bound = tolerance(expected, torch.bfloat16, reduction=config.n_layers, ulps=8)
    assert adapter_effect > bound  # a converter that lost or mixed up the adapters would show
    assert_close(got, expected, dtype=torch.bfloat16, reduction=config.n_layers, ulps=8, name="bf16 logits")

    # and a converter bug does show, in the tensors and in the logits: experts 0 and 1 of layer 1
    # trade places in the export
    err = (got - expected).abs().max()
    hf_tensors = convert.hf_tensors

    def swapped_experts(model, dtype, sparsetral=False):
        for key, t in hf_tensors(model, dtype, sparsetral):
            if ".layers.1." in key and ".expert_0." in key:
                key = key.replace(".expert_0.", ".expert_1.")
            elif ".layers.1." in key and ".expert_1." in key:
                key = key.replace(".expert_1.", ".expert_0.")
            yield key, t
    monkeypatch.setattr(convert, "hf_tensors", swapped_experts)
    _, bad, _ = converted_in_bf16(tmp_path / "bad")
    assert not all(torch.equal(t, expected_state[k]) for k, t in bad.state_dict().items())
    with torch.no_grad():
        assert (bad.to(device)(idx.to(device))[0].float().cpu() - expected).abs().max() > 2 * err
