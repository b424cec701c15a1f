"""
Convert checkpoints between the official layouts (Meta, Hugging Face, the released PESC models)
and the project's format.

    python convert.py --ckpt DIR --out_dir DIR [--dtype bf16|fp16|fp32] [--rope_theta X] [--force]  # import
    python convert.py --ckpt CKPT --out_dir DIR --to hf [--family F] [--dtype ...] [--force]         # export

Import reads, telling the layout from the files it finds (never from the folder's name):
- Meta consolidated: params.json + consolidated.NN.pth model-parallel shards (Llama 2, 3, 3.1);
  the shards are joined and q/k rows permuted from Meta's interleaved RoPE order to the halves
  order the project uses.
- Hugging Face dense: config.json + model*.safetensors or pytorch_model*.bin (Llama, Mistral,
  Yi, Qwen1.5/2), single file or sharded with an index.
- Official PESC: the same files plus per-expert adapters (Camelidae, Qwen2idae, sparsetral),
  stacked into the project's (E, r, dim) / (E, dim, r) tensors.
Tensors are streamed one at a time (safetensors safe_open, mmap'd torch.load), checked against
the shapes the config implies, and written by files.write_checkpoint into a temporary directory
that is renamed at the end: a failed conversion leaves nothing under --out_dir.

Export writes a project checkpoint as a Hugging Face Llama / Mistral / Qwen2 checkpoint, or a
PESC one as a Camelidae-style (Qwen2idae-style for q/k/v-bias bases; sparsetral-style with
--family sparsetral) checkpoint with the official key names and config keys, and an
`architectures` name only the vLLM plugin in serve/ claims (PESC_ARCHITECTURES). The tokenizer
goes along with tokenizer.json, the Jinja chat template and the stop ids, which transformers
and vLLM read (tokenizer.write_hf_tokenizer). LoRA, if the checkpoint has it, is merged first.
"""

import argparse
import os
import re
import sys
import tempfile

import torch

import cli
import tokenizer
from files import checkpoint_files, write_checkpoint
from model import LLAMA3_ROPE, ModelConfig, Transformer
from moe import LINEARS, PESCConfig, merge_lora
from tokenizer import Tokenizer, tokenizer_files

# -----------------------------------------------------------------------------
# Hugging Face names <-> project names

# per-layer suffixes: HF -> project; the seven linears come from moe.LINEARS
_HF_LAYER_KEYS = {
    **{f"{hf}.weight": f"{'attention' if hf.startswith('self_attn') else 'feed_forward'}.{attr}.weight"
       for attr, hf in LINEARS.values()},
    **{f"{LINEARS[t][1]}.bias": f"attention.{LINEARS[t][0]}.bias" for t in "qkv"},
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


# The official PESC per-expert adapters: Camelidae and Qwen2idae name expert e "expert_{e}",
# sparsetral just "{e}". One HF tensor is one expert's [r, hidden] down or [hidden, r] up matrix.
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.moe_adapter\.experts\.(expert_)?(\d+)\.adapter_(down|up)\.weight")


def expert_key(layer: int, expert: int, kind: str, sparsetral: bool = False) -> str:
    """Official name of one expert's adapter_down / adapter_up weight."""
    e = str(expert) if sparsetral else f"expert_{expert}"
    return f"model.layers.{layer}.mlp.moe_adapter.experts.{e}.adapter_{kind}.weight"


def hf_rope(hf: dict):
    """(rope_theta, rope_scaling) from an HF config: old keys or transformers 5's rope_parameters.
    The scaling dict goes to ModelConfig as it is, which reads its kind (rope_type, or the legacy
    type) and drops "default"."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), hf.get("rope_scaling") or params or None


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


# -----------------------------------------------------------------------------
# Shared plumbing

DTYPES = cli.DTYPES


def hf_dtype_name(dtype) -> str:
    """What HF configs call a dtype ("bfloat16"), torch's own name."""
    return str(dtype).removeprefix("torch.")

# Files a tokenizer may need, copied along in both directions. The tokenizer itself reads
# tokenizer.model (SentencePiece or tiktoken) or vocab.json + merges.txt; the rest is for HF.
class ConvertError(Exception):
    """Bad or unsupported input. The CLI prints it as `error: ...`, without a traceback."""


def read_json(path):
    try:
        return tokenizer.read_json(path)  # its ValueError names the file; here it is bad input
    except ValueError as e:
        raise ConvertError(str(e)) from None


def tokenizer_config(out_dir, src, chat_template):
    """tokenizer.write_tokenizer_config, its bad input (src's file) a ConvertError."""
    try:
        return tokenizer.write_tokenizer_config(out_dir, src, chat_template)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def torch_load(path):
    """A pickled state dict, memory-mapped and without unrestricted unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a pickle of something else, ...
        raise ConvertError(f"{path}: cannot be read as a PyTorch state dict ({e})") from None


def read_weights(path):
    """(key, tensor) of one HF weight file, read one tensor at a time."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            f = safe_open(path, framework="pt")
        except Exception as e:
            raise ConvertError(f"{path}: cannot be read as safetensors ({e})") from None
        with f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from torch_load(path).items()


def weight_keys(path):
    """The tensor names in one HF weight file, without reading the tensors."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise ConvertError(f"{path}: cannot be read as safetensors ({e})") from None
    return list(torch_load(path).keys())


def checked(tensors, expected: dict, dtype, config_file, source_name):
    """Check a stream of (name, tensor, file, key) against the shapes the config implies.

    Yields (name, tensor) cast to dtype (None: the first tensor's dtype, so a checkpoint with
    mixed dtypes comes out uniform). Raises on an unexpected or duplicated tensor, a wrong
    shape, and, once the stream ends, on every expected tensor that never came."""
    seen = set()
    for name, t, path, key in tensors:
        if name not in expected:
            raise ConvertError(f"{path}: tensor {key!r} has no place in the model {config_file} describes")
        if name in seen:
            raise ConvertError(f"{path}: tensor {key!r} appears twice")
        if tuple(t.shape) != expected[name]:
            raise ConvertError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                               f"{config_file} implies {expected[name]}")
        seen.add(name)
        dtype = dtype or t.dtype
        yield name, t.to(dtype).contiguous()
    missing = [source_name(k) for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConvertError(f"no tensor {', '.join(repr(k) for k in missing[:3])}{more}, "
                           f"which {config_file} requires")


def expected_shapes(config: ModelConfig) -> dict:
    """name -> shape of every tensor a checkpoint of this config holds (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("output.weight")  # the embedding is the LM head; files hold it once
    return shapes


def check_out(src, out, force):
    if os.path.realpath(src) == os.path.realpath(out):
        raise ConvertError(f"--out_dir {out} is the source checkpoint itself")
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out} exists; pass --force to replace it")


def detect_layout(src) -> str:
    """'meta', 'hf' or 'project', from the files in src."""
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    names = set(os.listdir(src))
    if "params.json" in names or any(re.fullmatch(r"consolidated\.\d+\.pth", n) for n in names):
        return "meta"
    if "config.json" in names:
        cfg = read_json(os.path.join(src, "config.json"))
        if isinstance(cfg, dict) and "n_layers" in cfg and "model_type" not in cfg:
            return "project"
        return "hf"
    raise ConvertError(f"{src}: unknown checkpoint layout; expected params.json + consolidated.NN.pth (Meta), "
                       f"config.json + model*.safetensors or pytorch_model*.bin (Hugging Face), "
                       f"or a project checkpoint")


# -----------------------------------------------------------------------------
# Meta consolidated checkpoints

# Model-parallel split dim of each sharded tensor (Meta's ColumnParallel: 0, RowParallel: 1).
# Norms are replicated; tok_embeddings is split on dim 1 by Llama 1/2 and on dim 0 by Llama 3.
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_to_hf_rows(w, n_heads: int):
    """Permute q/k rows from Meta's interleaved-pairs RoPE order to HF's halves order, per head.

    w: (n_heads * head_dim, ...) weight or bias; the rows of each head go from
    (pair, 2) order to (2, pair) order."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_ffn_dim(dim, multiple_of, ffn_dim_multiplier=None) -> int:
    """Meta's FFN size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def meta_config(params: dict, params_file, emb_rows: int, w1_rows: int, w1_key, tied: bool) -> ModelConfig:
    """ModelConfig from params.json, cross-checked with the joined embedding and w1 sizes."""
    dim, n_heads = params["dim"], params["n_heads"]
    ffn = meta_ffn_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    if ffn != w1_rows:
        raise ConvertError(f"{params_file}: multiple_of={params['multiple_of']} and ffn_dim_multiplier="
                           f"{params.get('ffn_dim_multiplier')} give an FFN size of {ffn}, but {w1_key!r} "
                           f"has {w1_rows} rows")
    vocab = params.get("vocab_size", -1)
    if vocab > 0 and vocab != emb_rows:  # -1 in Llama 2 files: the embedding says
        raise ConvertError(f"{params_file}: vocab_size={vocab}, but 'tok_embeddings.weight' has {emb_rows} rows")
    scaled = bool(params.get("use_scaled_rope", False))
    theta = float(params.get("rope_theta", 10000.0))
    # params.json has no context length: 4096 for Llama 2, 8192 for Llama 3, 128k for 3.1
    max_seq_len = 131072 if scaled else 8192 if emb_rows >= 128000 else 4096
    return ModelConfig(
        vocab_size=emb_rows, dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads, ffn_dim=ffn,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=theta, max_seq_len=max_seq_len, tie_embeddings=tied,
        rope_scaling=dict(LLAMA3_ROPE) if scaled else None,
    )


def read_meta(src):
    """(config, tensor stream, family, params.json path) of a Meta consolidated checkpoint."""
    params_file = os.path.join(src, "params.json")
    if not os.path.isfile(params_file):
        raise ConvertError(f"{src}: consolidated.NN.pth shards but no params.json")
    params = read_json(params_file)
    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        if not isinstance(params, dict) or key not in params:
            raise ConvertError(f"{params_file}: missing key {key!r}")
    numbers = sorted(int(m.group(1)) for n in os.listdir(src) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", n)))
    if not numbers:
        raise ConvertError(f"{src}: params.json but no consolidated.NN.pth shards")
    paths = [os.path.join(src, f"consolidated.{i:02d}.pth") for i in range(max(numbers) + 1)]
    for p in paths:
        if not os.path.isfile(p):
            raise ConvertError(f"{p}: shard missing ({len(numbers)} of {len(paths)} consolidated shards found)")
    shards = []
    for i, p in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {os.path.basename(p)}", flush=True)
        shards.append(torch_load(p))
    for p, shard in zip(paths[1:], shards[1:]):  # every shard holds a piece of every tensor
        for key in shards[0]:
            if key not in shard:
                raise ConvertError(f"{p}: no tensor {key!r}, which {os.path.basename(paths[0])} has")
        for key in shard:
            if key not in shards[0]:
                raise ConvertError(f"{p}: tensor {key!r} that {os.path.basename(paths[0])} lacks")

    n, dim = len(shards), params.get("dim")

    def split_dim(key):
        kind = key.split(".")[-2] if "." in key else key  # layers.0.attention.wq.weight -> wq
        if kind == "tok_embeddings":
            cols = shards[0][key].shape[1]
            if n == 1 or cols == dim:
                return 0  # Llama 3: vocab-parallel
            if cols * n == dim:
                return 1  # Llama 1/2: split along the embedding dim
            raise ConvertError(f"{paths[0]}: {key!r} has {cols} columns, neither dim={dim} nor dim/{n}")
        return _META_SPLIT.get(kind)  # None: replicated

    def joined(key):
        pieces = [s[key] for s in shards]
        d = split_dim(key)
        if d is None:
            for p, piece in zip(paths[1:], pieces[1:]):
                if not torch.equal(piece, pieces[0]):
                    raise ConvertError(f"{p}: replicated tensor {key!r} differs from {os.path.basename(paths[0])}'s")
            return pieces[0]
        return torch.cat(pieces, dim=d) if n > 1 else pieces[0]

    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in shards[0]:
            raise ConvertError(f"{paths[0]}: no tensor {key!r}; not a Llama consolidated checkpoint")
    emb_rows = shards[0]["tok_embeddings.weight"].shape[0] * (n if split_dim("tok_embeddings.weight") == 0 else 1)
    w1_rows = shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * n
    # params.json says nothing about tying; a checkpoint without output.weight is tied (Llama 3.2 1B/3B)
    tied = "output.weight" not in shards[0]
    config = meta_config(params, params_file, emb_rows, w1_rows, "layers.0.feed_forward.w1.weight", tied)

    def tensors():
        for key in shards[0]:
            if key == "rope.freqs":  # precomputed RoPE table, not a weight
                continue
            t = joined(key)
            if key.endswith("attention.wq.weight"):
                t = meta_to_hf_rows(t, config.n_heads)
            elif key.endswith("attention.wk.weight"):
                t = meta_to_hf_rows(t, config.n_kv_heads)  # n_kv_heads, not n_heads, under GQA
            yield key, t, paths[0] if n == 1 else os.path.join(src, "consolidated.*.pth"), key

    return config, tensors(), "meta", params_file


# -----------------------------------------------------------------------------
# Hugging Face checkpoints, dense and PESC

# model_type -> the dense architecture it computes with; PESC types name their base
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "yi": "llama",
                   "camelidae": "llama", "qwen2idae": "qwen2", "sparsetral": "mistral"}
_PESC_FAMILIES = ("camelidae", "qwen2idae", "sparsetral")
# The `architectures` name an export of each PESC family carries. Only the vLLM plugin (serve/)
# claims these names, so an engine without it refuses the export instead of building the dense
# base model that the released configs name (LlamaForCausalLM, Qwen2ForCausalLM).
PESC_ARCHITECTURES = {"camelidae": "CamelidaeForCausalLM", "qwen2idae": "Qwen2idaeForCausalLM",
                      "sparsetral": "SparsetralForCausalLM"}


def hf_weight_files(src):
    """(files, index path or None, index weight_map or None) of an HF checkpoint directory."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(src, index_name)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: no weight_map")
            by_file = {}
            for key, fname in weight_map.items():
                by_file.setdefault(fname, key)
            for fname, key in sorted(by_file.items()):
                if not os.path.isfile(os.path.join(src, fname)):
                    raise ConvertError(f"{index}: shard {fname} (holding {key!r} ...) is missing")
            return [os.path.join(src, f) for f in sorted(by_file)], index, weight_map
        if os.path.isfile(os.path.join(src, single)):
            return [os.path.join(src, single)], None, None
    raise ConvertError(f"{src}: config.json but no weights (model.safetensors[.index.json] or "
                       f"pytorch_model.bin[.index.json])")


def hf_model_config(hf: dict, cfg_file, keys):
    """(ModelConfig, family) for an HF dense or official PESC config.json and its tensor names."""
    model_type = str(hf.get("model_type", "")).lower()
    if model_type not in _HF_MODEL_TYPES:
        raise ConvertError(f"{cfg_file}: model_type {hf.get('model_type')!r} is not a supported layout "
                           f"(one of {', '.join(_HF_MODEL_TYPES)})")
    base = _HF_MODEL_TYPES[model_type]
    experts = [m for k in keys if (m := _EXPERT_RE.fullmatch(k))]
    is_pesc = any(".mlp.moe_adapter." in k for k in keys) or model_type in _PESC_FAMILIES or "num_experts" in hf
    if not is_pesc:
        family = model_type
    elif model_type in _PESC_FAMILIES:
        family = model_type
    elif experts and not experts[0].group(2):
        family = "sparsetral"  # "experts.{e}." rather than "experts.expert_{e}."
    else:
        family = "qwen2idae" if base == "qwen2" else "camelidae"
    try:
        config = hf_config_to_model_config({**hf, "model_type": base}, cfg_file)
    except KeyError as e:
        raise ConvertError(e.args[0]) from None
    except ValueError as e:
        raise ConvertError(f"{cfg_file}: {e}") from None

    if is_pesc:
        try:
            pesc = PESCConfig(num_experts=int(hf["num_experts"]), top_k=int(hf["topk"]),
                              adapter_dim=int(hf["adapter_dim"]), adapter_scaling=float(hf["moe_scaling"]),
                              adapter_dropout=float(hf.get("adapter_dropout", 0.0 if family == "sparsetral" else 0.1)))
        except KeyError as e:
            raise ConvertError(f"{cfg_file}: PESC checkpoint without {e.args[0]!r} in its config") from None
        except ValueError as e:
            raise ConvertError(f"{cfg_file}: {e}") from None
        config.moe = pesc
    return config, family


def set_rope_base(config: ModelConfig, family: str, rope_theta, cfg_file, architectures=()):
    """The RoPE base a converted checkpoint computes with, in place: --rope_theta when given;
    for Camelidae 10000, since the official modeling code never reads rope_theta; else the
    source config's (also for this project's own Camelidae export, whose architectures name from
    PESC_ARCHITECTURES says that its rope_theta is the one it computed with). Each choice is
    announced."""
    if rope_theta is not None:
        print(f"rope_theta {rope_theta:g} (--rope_theta; {cfg_file} says {config.rope_theta:g})")
        config.rope_theta = float(rope_theta)
    elif family == "camelidae" and PESC_ARCHITECTURES["camelidae"] in architectures:
        print(f"Camelidae exported by this project ({PESC_ARCHITECTURES['camelidae']}): RoPE base "
              f"{config.rope_theta:g} as its config says")
    elif family == "camelidae" and config.rope_theta != 10000.0:
        print(f"Camelidae: the official code ignores rope_theta ({config.rope_theta:g} in {cfg_file}) and "
              f"uses 10000; converting with 10000 (pass --rope_theta to override)")
        config.rope_theta = 10000.0
    elif family == "camelidae":
        print("Camelidae: RoPE base 10000, as the official code uses (pass --rope_theta to override)")


def read_hf(src):
    """(config, tensor stream, family, config file) of an HF dense or PESC checkpoint."""
    cfg_file = os.path.join(src, "config.json")
    hf = read_json(cfg_file)
    if not isinstance(hf, dict):
        raise ConvertError(f"{cfg_file}: expected a JSON object")
    files, index, weight_map = hf_weight_files(src)
    keys = list(weight_map) if weight_map else weight_keys(files[0])
    config, family = hf_model_config(hf, cfg_file, keys)
    sparsetral = family == "sparsetral"
    E = config.moe.num_experts if config.moe else 0

    # A tied checkpoint may still hold lm_head.weight; it must then equal the embedding.
    check_tie = config.tie_embeddings and "lm_head.weight" in keys

    def tensors():
        pending = {}  # (layer, "down"|"up") -> {expert: tensor}, until all E experts are in
        embedding = lm_head = None  # held only until the tie check is done
        for i, path in enumerate(files, 1):
            print(f"[{i}/{len(files)}] {os.path.basename(path)}", flush=True)
            found = set()
            for key, t in read_weights(path):
                found.add(key)
                if key.endswith("rotary_emb.inv_freq"):  # a RoPE table some checkpoints carry
                    continue
                m = _EXPERT_RE.fullmatch(key)
                if m and config.moe is not None:
                    layer, e, kind = int(m.group(1)), int(m.group(3)), m.group(4)
                    if bool(m.group(2)) == sparsetral or e >= E:
                        raise ConvertError(f"{path}: tensor {key!r} is not an expert of this {family} checkpoint "
                                           f"({cfg_file}: num_experts={E}, names like "
                                           f"{expert_key(0, 0, 'down', sparsetral)!r})")
                    group = pending.setdefault((layer, kind), {})
                    if e in group:
                        raise ConvertError(f"{path}: tensor {key!r} appears twice")
                    group[e] = t
                    if len(group) == E:  # (E, r, dim) for down, (E, dim, r) for up
                        del pending[(layer, kind)]
                        stacked = torch.stack([group[j].to(t.dtype) for j in range(E)])
                        name = f"layers.{layer}.feed_forward.adapter_{kind}"
                        yield name, stacked, path, hf_source_name(name)
                    continue
                name = hf_key_to_project(key)
                if name is None:
                    raise ConvertError(f"{path}: unknown tensor {key!r}")
                if check_tie and name in ("tok_embeddings.weight", "output.weight"):
                    if name == "output.weight":
                        lm_head = (t, path)
                    else:
                        embedding = t
                    if lm_head is not None and embedding is not None:
                        if not torch.equal(lm_head[0], embedding):
                            raise ConvertError(f"{lm_head[1]}: 'lm_head.weight' differs from "
                                               f"'model.embed_tokens.weight', but {cfg_file} sets tie_word_embeddings")
                        embedding = lm_head = None
                if name == "output.weight" and config.tie_embeddings:
                    continue  # the project's files hold a tied weight once, as the embedding
                yield name, t, path, key
            if weight_map:
                listed = [k for k, f in weight_map.items() if f == os.path.basename(path) and k not in found]
                if listed:
                    raise ConvertError(f"{path}: no tensor {listed[0]!r}, which {index} places in it")
        for (layer, kind), group in pending.items():
            e = next(j for j in range(E) if j not in group)
            raise ConvertError(f"{src}: no tensor {expert_key(layer, e, kind, sparsetral)!r} "
                               f"({cfg_file}: num_experts={E})")

    return config, tensors(), family, cfg_file


def hf_source_name(name: str) -> str:
    """The official name of a project tensor, for error messages."""
    m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.adapter_(down|up)", name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.moe_adapter.experts.*.adapter_{m.group(2)}.weight"
    return project_key_to_hf(name)


# -----------------------------------------------------------------------------
# Tokenizer files


def chat_template(family: str, kind, vocab_size: int) -> str:
    """The chat template a converted checkpoint defaults to."""
    if family == "camelidae":
        return "camelidae"
    if family in ("qwen2idae", "sparsetral", "qwen2") or kind == "bpe":
        return "chatml"
    if kind == "tiktoken" or (kind is None and vocab_size >= 128000):
        return "llama3"
    return "llama2"  # SentencePiece: Llama 2, Mistral, Yi


def tokenizer_kind(src, vocab_size: int):
    """The tokenizer kind in src ('tiktoken', 'sentencepiece', 'bpe'), or None with a warning."""
    try:
        tok = Tokenizer(src, template="llama2")  # the template is not needed here
    except (OSError, ValueError, KeyError) as e:
        print(f"warning: no tokenizer the project can read ({e}); add tokenizer.model or "
              f"vocab.json + merges.txt to the output before sampling", file=sys.stderr)
        return None
    if tok.vocab_size > vocab_size:
        print(f"warning: the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} embeddings",
              file=sys.stderr)
    return tok.kind


# -----------------------------------------------------------------------------
# Import


def read_official(src, layout, rope_theta=None):
    """(config, tensor stream, family, config file, HF config dict) of a Meta or HF checkpoint,
    with the RoPE base set (set_rope_base)."""
    if layout == "meta":
        config, tensors, family, cfg_file = read_meta(src)
        hf = {}
    else:
        config, tensors, family, cfg_file = read_hf(src)
        hf = read_json(cfg_file)
    set_rope_base(config, family, rope_theta, cfg_file, hf.get("architectures") or ())
    return config, tensors, family, cfg_file, hf


def convert_checkpoint(src, out, dtype=None, rope_theta=None, force=False, max_shard_bytes=5 * 2**30):
    """Import a Meta, Hugging Face or official PESC checkpoint dir into a project checkpoint at out.

    dtype: "bf16" | "fp16" | "fp32" | a torch dtype | None (the config's torch_dtype, else the
    first tensor's). rope_theta overrides the RoPE base (Camelidae defaults to 10000).
    Returns the ModelConfig written."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out(src, out, force)
    layout = detect_layout(src)
    if layout == "project":
        raise ConvertError(f"{src} is already a project checkpoint (export it with --to hf)")
    config, tensors, family, cfg_file, hf = read_official(src, layout, rope_theta)
    dtype = DTYPES.get(dtype, dtype)
    if dtype is None:  # an HF config names its dtype; transformers 5 calls it "dtype"
        name = hf.get("torch_dtype") or hf.get("dtype")
        dtype = {hf_dtype_name(d): d for d in DTYPES.values()}.get(name)
    moe_text = f", PESC {config.moe.num_experts} experts top-{config.moe.top_k}" if config.moe else ""
    print(f"{layout} checkpoint ({family}{moe_text}): {config.n_layers} layers, dim {config.dim}, "
          f"vocab {config.vocab_size}", flush=True)

    source_name = (lambda k: k) if layout == "meta" else hf_source_name
    state = checked(tensors, expected_shapes(config), dtype, cfg_file, source_name)

    kind = tokenizer_kind(src, config.vocab_size)
    template = chat_template(family, kind, config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        # src's added tokens stay (sparsetral's <|im_start|> ...); chat_template becomes a name
        tok_config_file = tokenizer_config(tmp, src, template)
        extra = tokenizer_files(src) + [(tok_config_file, "tokenizer_config.json")]
        write_checkpoint(out, config.to_dict(), state, max_shard_bytes, extra_files=extra, overwrite=force)
    print(f"wrote {out} (chat template {template})")
    return config


# -----------------------------------------------------------------------------
# The official trainer's output (train_moe.py): checkpoint-N/adapter_model/ (a PEFT LoRA) and
# checkpoint-N/moe_model.bin (routers and adapter experts), on the base they were trained on

# PEFT target module names -> their HF module paths inside a layer
_PEFT_MODULES = {hf.split(".")[1]: hf for _, hf in LINEARS.values()}
_PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the HF model
_PEFT_LORA_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.(\w+))\.lora_(A|B)\.weight")
_ROUTER_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.moe_adapter\.router\.weight")


def read_peft_lora(adapter_dir, shapes: dict):
    """{project weight name: (alpha / r) * B @ A in fp32} of a PEFT LoRA directory, checked
    against the base's shapes (name -> shape) and its adapter_config.json."""
    cfg_file = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ConvertError(f"{adapter_dir}: no adapter_config.json (the PEFT LoRA of the training output)")
    cfg = read_json(cfg_file)
    for key in ("r", "lora_alpha", "target_modules"):
        if not isinstance(cfg, dict) or key not in cfg:
            raise ConvertError(f"{cfg_file}: missing key {key!r}")
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ConvertError(f"{cfg_file}: rsLoRA / DoRA adapters are not supported (plain LoRA only)")
    targets = cfg["target_modules"]
    if not isinstance(targets, list) or not set(targets) <= set(_PEFT_MODULES):
        raise ConvertError(f"{cfg_file}: target_modules {targets!r}: expected a list of {list(_PEFT_MODULES)}")
    rank, scale = int(cfg["r"]), float(cfg["lora_alpha"]) / int(cfg["r"])
    files = [os.path.join(adapter_dir, n) for n in ("adapter_model.safetensors", "adapter_model.bin")]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ConvertError(f"{adapter_dir}: neither adapter_model.safetensors nor adapter_model.bin")
    pairs = {}  # project name -> {"A": tensor, "B": tensor}
    for key, t in read_weights(files[0]):
        m = _PEFT_LORA_RE.fullmatch(key)
        if not m or _PEFT_MODULES.get(m.group(3)) != m.group(2):
            raise ConvertError(f"{files[0]}: tensor {key!r} is not a LoRA A/B weight of a base linear")
        if m.group(3) not in targets:
            raise ConvertError(f"{files[0]}: tensor {key!r} is on {m.group(3)}, which is not among "
                               f"{cfg_file}'s target_modules {targets}")
        name = f"layers.{m.group(1)}.{_HF_LAYER_KEYS[m.group(2) + '.weight']}"
        if name not in shapes:
            raise ConvertError(f"{files[0]}: tensor {key!r}: the base has no layer {m.group(1)}")
        out_dim, in_dim = shapes[name]
        want = (rank, in_dim) if m.group(4) == "A" else (out_dim, rank)
        if tuple(t.shape) != want:
            raise ConvertError(f"{files[0]}: tensor {key!r} has shape {tuple(t.shape)}; rank r={rank} "
                               f"({cfg_file}) on the base's {tuple(shapes[name])} weight needs {want}")
        pairs.setdefault(name, {})[m.group(4)] = t
    n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
    for layer in range(n_layers):
        for module in targets:
            name = f"layers.{layer}.{_HF_LAYER_KEYS[_PEFT_MODULES[module] + '.weight']}"
            for part in "AB":
                if part not in pairs.get(name, {}):
                    raise ConvertError(f"{files[0]}: no tensor '{_PEFT_PREFIX}model.layers.{layer}."
                                       f"{_PEFT_MODULES[module]}.lora_{part}.weight' ({cfg_file} targets {module})")
    return {name: scale * (p["B"].float() @ p["A"].float()) for name, p in pairs.items()}


def read_moe_adapters(path, config: ModelConfig):
    """(num_experts, adapter_dim, {project name: tensor}) from the trainer's moe_model.bin."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing (the routers and adapter experts of the training output)")
    routers, experts = {}, {}  # layer -> router; (layer, kind) -> {expert: tensor}
    for key, t in torch_load(path).items():
        hf_key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else ""
        if m := _EXPERT_RE.fullmatch(hf_key):
            if not m.group(2):
                raise ConvertError(f"{path}: tensor {key!r}: the official trainer names experts 'expert_E'")
            experts.setdefault((int(m.group(1)), m.group(4)), {})[int(m.group(3))] = (t, key)
        elif m := _ROUTER_RE.fullmatch(hf_key):
            routers[int(m.group(1))] = (t, key)
        else:
            raise ConvertError(f"{path}: tensor {key!r} is neither a router nor an adapter expert "
                               f"('{_PEFT_PREFIX}model.layers.I.mlp.moe_adapter...')")
    if 0 not in routers:
        raise ConvertError(f"{path}: no tensor '{_PEFT_PREFIX}model.layers.0.mlp.moe_adapter.router.weight'")
    E = routers[0][0].shape[0]
    first = experts.get((0, "down"), {}).get(0)
    if first is None:
        raise ConvertError(f"{path}: no tensor '{_PEFT_PREFIX}{expert_key(0, 0, 'down')}'")
    r = first[0].shape[0]
    state = {}
    for layer in range(config.n_layers):
        if layer not in routers:
            raise ConvertError(f"{path}: no router for layer {layer} "
                               f"('{_PEFT_PREFIX}model.layers.{layer}.mlp.moe_adapter.router.weight')")
        state[f"layers.{layer}.feed_forward.router.weight"] = routers[layer]
        for kind in ("down", "up"):
            group = experts.get((layer, kind), {})
            for e in range(E):
                if e not in group:
                    raise ConvertError(f"{path}: no tensor '{_PEFT_PREFIX}{expert_key(layer, e, kind)}' "
                                       f"(the routers have {E} experts)")
            if len(group) != E:
                raise ConvertError(f"{path}: layer {layer} has {len(group)} {kind} adapters, the router {E}")
            shape = (r, config.dim) if kind == "down" else (config.dim, r)
            for e, (t, key) in group.items():
                if tuple(t.shape) != shape:
                    raise ConvertError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}; the base's dim "
                                       f"{config.dim} and adapter dim {r} need {shape}")
            state[f"layers.{layer}.feed_forward.adapter_{kind}"] = (torch.stack([group[e][0] for e in range(E)]), key)
    extra = sorted(set(routers) - set(range(config.n_layers)))
    if extra:
        raise ConvertError(f"{path}: a router for layer {extra[0]}, but the base has {config.n_layers} layers")
    return E, r, state


def convert_training_output(src, training_output, out, top_k, adapter_scaling, dtype=None, rope_theta=None,
                            force=False, max_shard_bytes=5 * 2**30):
    """Merge the official trainer's checkpoint-N (PEFT LoRA + moe_model.bin) with the dense base
    it trained on (HF, Meta or project checkpoint) into a PESC project checkpoint at out.

    The LoRA is merged into the base with scaling lora_alpha / r, as merge_moe_lora.py does. The
    number of experts and the adapter dim come from the tensors; top_k and adapter_scaling
    cannot, and the official scripts disagree on them, so the caller must give both."""
    if top_k is None or adapter_scaling is None:
        raise ConvertError("--training_output needs --experts_per_token and --adapter_scaling: the official "
                           "train and merge scripts disagree on them (the tensors do not say), so there is no default")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out(src, out, force)
    if not os.path.isdir(training_output):
        raise ConvertError(f"--training_output {training_output}: no such directory (the trainer's checkpoint-N)")
    layout = detect_layout(src)
    if layout == "project":
        cfg_file = os.path.join(src, "config.json")
        config = ModelConfig.from_dict(read_json(cfg_file), cfg_file)

        def project_tensors():
            from safetensors import safe_open

            for fname in checkpoint_files(src):
                with safe_open(fname, framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key), fname, key
        tensors, source_name = project_tensors(), (lambda k: k)
    else:
        config, tensors, _, cfg_file, _ = read_official(src, layout, rope_theta)
        source_name = (lambda k: k) if layout == "meta" else hf_source_name
    if config.moe is not None:
        raise ConvertError(f"{src} is already a PESC checkpoint; --ckpt must be the dense base the run trained on")
    shapes = expected_shapes(config)
    deltas = read_peft_lora(os.path.join(training_output, "adapter_model"), shapes)
    E, r, adapters = read_moe_adapters(os.path.join(training_output, "moe_model.bin"), config)
    try:
        config.moe = PESCConfig(num_experts=E, top_k=top_k, adapter_dim=r, adapter_scaling=adapter_scaling)
    except ValueError as e:
        raise ConvertError(f"--experts_per_token {top_k}: {e}") from None
    print(f"{training_output}: LoRA on {len(deltas)} base linears merged; PESC {E} experts, adapter dim {r}, "
          f"top-{top_k}, scaling {adapter_scaling:g}", flush=True)

    def merged():
        for name, t, path, key in tensors:
            if name in deltas:  # the file's values plus the update, in fp32, back to the file's dtype
                t = (t.float() + deltas.pop(name)).to(t.dtype)
            yield name, t, path, key
        for name, (t, key) in adapters.items():
            yield name, t, os.path.join(training_output, "moe_model.bin"), key

    state = checked(merged(), expected_shapes(config), DTYPES.get(dtype, dtype), cfg_file, source_name)
    kind = tokenizer_kind(src, config.vocab_size)
    template = chat_template("qwen2idae" if config.qkv_bias else "camelidae", kind, config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok_config_file = tokenizer_config(tmp, src, template)  # the trainer's template, Camelidae's
        extra = tokenizer_files(src) + [(tok_config_file, "tokenizer_config.json")]
        write_checkpoint(out, config.to_dict(), state, max_shard_bytes, extra_files=extra, overwrite=force)
    print(f"wrote {out} (chat template {template})")
    return config


# -----------------------------------------------------------------------------
# Export


_OFFICIAL_CLASSES = {"camelidae": ("CamelidaeConfig", "LlamaForCausalLM"),
                     "qwen2idae": ("Qwen2idaeConfig", "Qwen2ForCausalLM")}


def hf_config(config: ModelConfig, dtype, family=None) -> dict:
    """An HF config.json for a project config: Llama, Mistral (sliding window), Qwen2 (q/k/v
    bias); for PESC, Camelidae-style (Qwen2idae-style on a q/k/v-bias base), or sparsetral-style
    (a Mistral config) when family is "sparsetral". A PESC export names its family's
    PESC_ARCHITECTURES class, which only the vLLM plugin serves."""
    c = config
    family = family or (None if c.moe is None else "qwen2idae" if c.qkv_bias else "camelidae")
    if family is not None and c.moe is None:
        raise ConvertError(f"--family {family}: the checkpoint is a dense model (no PESC settings)")
    if family is not None and family not in PESC_ARCHITECTURES:
        raise ConvertError(f"--family {family!r}: expected one of {', '.join(PESC_ARCHITECTURES)}")
    if (family == "qwen2idae") != bool(c.moe is not None and c.qkv_bias):
        raise ConvertError(f"--family {family}: this model's q/k/v bias is {'on' if c.qkv_bias else 'off'}; "
                           f"only qwen2idae (a Qwen2 base) has q/k/v bias")
    # sparsetral's Mistral code has a sliding window, the Camelidae/Qwen2idae codes none (warned below)
    window = c.sliding_window if family in (None, "sparsetral") else None
    if c.qkv_bias and window is not None:
        raise ConvertError("a model with both q/k/v bias and a sliding window has no HF equivalent here")
    arch, model_type = (("Qwen2ForCausalLM", "qwen2") if c.qkv_bias else
                        ("MistralForCausalLM", "mistral") if window is not None or family == "sparsetral" else
                        ("LlamaForCausalLM", "llama"))
    hf = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": hf_dtype_name(dtype),
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = window
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if family is not None:
        p = c.moe
        hf["architectures"], hf["model_type"] = [PESC_ARCHITECTURES[family]], family
        if family in _OFFICIAL_CLASSES:
            # the official code's classes (what its merge scripts write): with its two .py files put
            # beside config.json, transformers loads the export with trust_remote_code=True
            hf["auto_map"] = {"AutoConfig": f"configuration_{family}.{_OFFICIAL_CLASSES[family][0]}",
                              "AutoModelForCausalLM": f"modeling_{family}.{_OFFICIAL_CLASSES[family][1]}"}
        hf.update(num_experts=p.num_experts, topk=p.top_k, adapter_dim=p.adapter_dim,
                  moe_scaling=p.adapter_scaling, adapter_dropout=p.adapter_dropout,
                  moe_dtype=hf_dtype_name(dtype), output_router_logits=False)
        if family == "camelidae" and c.rope_theta != 10000.0:
            print(f"warning: the official Camelidae code ignores rope_theta and uses 10000; this model uses "
                  f"{c.rope_theta:g}, so that code will not compute the same logits", file=sys.stderr)
        if c.sliding_window is not None and window is None:
            print(f"warning: {family} models have no sliding window; this model's "
                  f"{c.sliding_window}-token window is lost (--family sparsetral keeps it)", file=sys.stderr)
    return hf


def hf_tensors(model, dtype, sparsetral=False):
    """(HF name, tensor) of a project model: official names, per-expert adapters unstacked
    (named `experts.{e}.` for sparsetral, `experts.expert_{e}.` otherwise)."""
    for name, t in model.state_dict().items():
        if name == "output.weight" and model.config.tie_embeddings:
            continue
        t = t.to(dtype)
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.adapter_(down|up)", name)
        if m:  # (E, r, dim) / (E, dim, r) -> one [r, hidden] / [hidden, r] tensor per expert
            for e in range(t.shape[0]):
                yield expert_key(int(m.group(1)), e, m.group(2), sparsetral), t[e].clone()  # own storage
            continue
        yield project_key_to_hf(name), t


# HF tokenizer files of a source that the export writes anew from the project's tokenizer
# (tokenizer.write_hf_tokenizer); copying them too could contradict it.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "generation_config.json")


def hf_tokenizer_files(src, tmp):
    """(path, name) of the tokenizer files an export carries: the project's own (tokenizer.model,
    or vocab.json + merges.txt) and the HF ones written from them into tmp; [] when src has none."""
    own = [(path, name) for path, name in tokenizer_files(src) if name not in _HF_TOKENIZER_FILES]
    if not own:
        print(f"warning: {src} has no tokenizer; the export has none either", file=sys.stderr)
        return []
    try:
        return own + tokenizer.write_hf_tokenizer(Tokenizer(src), tmp)
    except (OSError, ValueError, KeyError) as e:
        raise ConvertError(f"the tokenizer cannot be exported: {e.args[0] if e.args else e}") from None


def export_hf(src, out, dtype=None, force=False, max_shard_bytes=5 * 2**30, family=None):
    """Export the project checkpoint src as a Hugging Face checkpoint at out, with tokenizer.json,
    the Jinja chat template and the stop ids. family: the PESC layout (default camelidae, or
    qwen2idae for a q/k/v-bias base; sparsetral). Returns its config.json dict."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out(src, out, force)
    if detect_layout(src) != "project":
        raise ConvertError(f"{src}: not a project checkpoint (config.json with the project's keys)")
    try:
        model = Transformer.from_pretrained(src)
    except (OSError, KeyError, ValueError) as e:
        raise ConvertError(e.args[0] if e.args else str(e)) from None
    if model.config.lora is not None:
        print("merging LoRA into the base weights")
        merge_lora(model)
    dtype = DTYPES.get(dtype, dtype) or model.tok_embeddings.weight.dtype
    config = hf_config(model.config, dtype, family)
    print(f"exporting {src} as {config['model_type']} ({config['architectures'][0]})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        extra = hf_tokenizer_files(src, tmp)
        tensors = hf_tensors(model, dtype, config["model_type"] == "sparsetral")
        write_checkpoint(out, config, tensors, max_shard_bytes, extra_files=extra, overwrite=force)
    print(f"wrote {out}")
    if "auto_map" in config:
        print(f"to load it with the official {config['model_type']} code, put its configuration_*.py and "
              f"modeling_*.py files in {out} (config.json's auto_map names them); to serve it with vLLM, "
              f"pip install ./serve (README: Serving)")
    return config


# -----------------------------------------------------------------------------


# old option names that still work, with a note
RENAMED = {"--src": "--ckpt", "--out": "--out_dir", "--top_k": "--experts_per_token"}


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert checkpoints: official layouts -> project (default), "
                                            "or project -> Hugging Face (--to hf).", allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint directory to read")
    p.add_argument("--out_dir", required=True, help="directory to write (must not exist unless --force)")
    p.add_argument("--to", choices=("project", "hf"), default="project", help="direction (default: import)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="output dtype (default: the source's)")
    p.add_argument("--rope_theta", type=float, default=None,
                   help="RoPE base to use instead of the config's (import only; Camelidae defaults to 10000)")
    p.add_argument("--force", default=False, **cli.FLAG, help="replace an existing --out_dir")
    p.add_argument("--family", choices=tuple(PESC_ARCHITECTURES), default=None,
                   help="--to hf of a PESC checkpoint: the layout (default camelidae, qwen2idae on a q/k/v-bias base)")
    g = p.add_argument_group("the official trainer's output (--ckpt is then the dense base it trained on)")
    g.add_argument("--training_output", default=None,
                   help="checkpoint-N of train_moe.py: adapter_model/ (PEFT LoRA) and moe_model.bin")
    g.add_argument("--experts_per_token", type=int, default=None,
                   help="experts per token, top-k (required: not in the files)")
    g.add_argument("--adapter_scaling", type=float, default=None,
                   help="the adapters' scaling s, moe_scaling (required: not in the files)")
    args = cli.parse(p, argv, RENAMED)
    try:
        if args.training_output is not None:
            if args.to == "hf":
                raise ConvertError("--training_output imports; export the result with a second --to hf call")
            convert_training_output(args.ckpt, args.training_output, args.out_dir, args.experts_per_token,
                                    args.adapter_scaling, args.dtype, args.rope_theta, args.force)
        elif args.experts_per_token is not None or args.adapter_scaling is not None:
            raise ConvertError("--experts_per_token and --adapter_scaling go with --training_output")
        elif args.to == "hf":
            if args.rope_theta is not None:
                raise ConvertError("--rope_theta applies to import only")
            export_hf(args.ckpt, args.out_dir, args.dtype, args.force, family=args.family)
        elif args.family is not None:
            raise ConvertError("--family applies to --to hf only")
        else:
            convert_checkpoint(args.ckpt, args.out_dir, args.dtype, args.rope_theta, args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
