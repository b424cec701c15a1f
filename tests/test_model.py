"""model.py: parity with Hugging Face transformers, KV cache, checkpoints, presets."""

import json

import pytest
import torch
import torch.nn.functional as F

import transformers  # test-only reference (requirements-dev.txt)

import model
import moe
from convert import hf_config_to_model_config, hf_key_to_project
from model import ModelConfig, Transformer, attention_mask, cross_entropy
from moe import LoRAConfig, PESCConfig, add_lora, upcycle
from tolerance import assert_close, tolerance

TINY_HF = dict(vocab_size=97, hidden_size=64, intermediate_size=120, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def model_reduction(config, backward=False):
    """The reduction length (tolerance.py) of a whole model: its longest dot, the FFN's, once per
    layer, since the layers add their errors; a loss or a backward pass adds the vocab's sums."""
    return config.ffn_dim * config.n_layers + (config.vocab_size if backward else 0)


def load_from_hf(hf_model) -> Transformer:
    """The project model holding an HF model's weights, through convert.py's key mapping."""
    config = hf_config_to_model_config(hf_model.config.to_dict())
    model = Transformer(config)
    state = {}
    for k, v in hf_model.state_dict().items():
        name = hf_key_to_project(k)
        assert name is not None, f"unmapped HF key {k}"
        state[name] = v
    if config.tie_embeddings:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(input_ids=idx).logits


CASES = {
    "llama-gqa": (transformers.LlamaConfig, dict(rope_theta=5e5), 40),
    "llama-linear": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), 40),
    # dynamic NTK changes the base only past max_position_embeddings: run 80 > 64 tokens
    "llama-dynamic": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 80),
    "llama3-scaled": (transformers.LlamaConfig, dict(rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), 40),
    "llama-mha-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True), 40),
    # sequence (40) longer than the window (16)
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=16, rope_theta=1e6, head_dim=16), 40),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6), 40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity(case):
    cls, extra, T = CASES[case]
    torch.manual_seed(0)
    hf_cfg = cls(**{**TINY_HF, **extra})
    hf_cfg._attn_implementation = "eager"
    hf_model = getattr(transformers, cls.__name__.replace("Config", "ForCausalLM"))(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms trivially; make them count
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = load_from_hf(hf_model)
    if case.startswith("qwen2"):
        assert model.config.qkv_bias and model.layers[0].attention.wq.bias is not None
    if case.startswith("mistral"):
        assert model.config.sliding_window == 16
    idx = torch.randint(0, TINY_HF["vocab_size"], (2, T))
    ref = hf_logits(hf_model, idx)
    with torch.no_grad():
        logits, loss = model(idx)
    assert loss is None and logits.shape == (2, T, TINY_HF["vocab_size"])
    assert_close(logits, ref, reduction=model_reduction(model.config))


def test_sliding_window_matters():
    # guard against a parity test that passes because the window never bites
    cfg = ModelConfig.from_preset("tiny", sliding_window=8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        a = model(idx)[0]
        model.config.sliding_window = None
        b = model(idx)[0]
    assert_close(a[:, :8], b[:, :8], reduction=model_reduction(cfg))  # masked vs causal attention kernels
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 100 * tolerance(b, reduction=model_reduction(cfg))  # far beyond rounding


def test_sliding_window_applies_to_packed_rows():
    # packed rows pass doc ids, which take the masked path; the window must still hold inside it
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", sliding_window=5)).eval()
    idx = torch.randint(0, 512, (1, 16))
    one_doc = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        assert_close(model(idx, doc_ids=one_doc)[0], model(idx)[0], reduction=model_reduction(model.config))


def test_attention_mask_rule():
    """Causal by position, inside a document, within the window; empty cache slots never visible."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    m = attention_mask(pos, pos, doc, doc, sliding_window=2)[0]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 4), (5, 5), (6, 5), (6, 6)]:
        expected[q, k] = True
    assert torch.equal(m, expected)
    assert torch.equal(attention_mask(pos[:, :3], pos[:, :3])[0], torch.ones(3, 3, dtype=torch.bool).tril())
    empty = torch.full((1, 2), torch.iinfo(torch.long).max)  # as setup_cache leaves unwritten slots
    assert not attention_mask(pos[:, :3], empty).any()


@pytest.mark.parametrize("preset,window", [("tiny", None), ("tiny-qwen", None), ("tiny", 6)])
def test_kv_cache_matches_full_forward(preset, window):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, sliding_window=window)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)[0]
        model.setup_cache(max_batch_size=2, max_seq_len=32)
        prefill = model(idx[:, :7], input_pos=torch.arange(7))[0]
        steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(7, 20)]
    inc = torch.cat([prefill] + steps, dim=1)
    assert_close(inc, full, reduction=model_reduction(cfg))


def test_cache_requires_input_pos():
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_ignored_targets():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    targets = torch.randint(0, cfg.vocab_size, (2, 10))
    targets[0, :6] = -100
    targets[1, 3] = -100
    with torch.no_grad():
        loss = model(idx, targets)[1]
        logits = model(idx)[0]  # with targets, the fused LM head + loss (CUDA) returns no logits
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert_close(loss, expected, reduction=cfg.vocab_size)  # the log-sum-exp over the vocab
    # changing an ignored target changes nothing
    targets2 = targets.clone()
    targets2[0, 2] = -100
    targets2[0, :6] = -100
    with torch.no_grad():
        assert torch.equal(model(idx, targets2)[1], loss)
    # all ignored: 0, not NaN
    assert cross_entropy(logits, torch.full_like(targets, -100)).item() == 0.0


def test_save_load_roundtrip_bit_exact(tmp_path):
    torch.manual_seed(0)
    for preset in ("tiny", "tiny-qwen"):
        model = Transformer(ModelConfig.from_preset(preset))
        out = tmp_path / preset
        model.save_pretrained(out, max_shard_bytes=40_000)  # force several shards
        assert (out / "model.safetensors.index.json").exists()
        loaded = Transformer.from_pretrained(out, device=model.output.weight.device)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        if model.config.tie_embeddings:
            assert loaded.output.weight is loaded.tok_embeddings.weight
        idx = torch.randint(0, 512, (1, 9))
        with torch.no_grad():
            assert torch.equal(model(idx)[0], loaded(idx)[0])
    # no temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-qwen"]


def test_load_dtype(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_strict_loading_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)

    bad = dict(state)
    bad.pop("layers.1.attention.wk.weight")
    save_file(bad, f)
    with pytest.raises(KeyError, match="layers.1.attention.wk.weight"):
        Transformer.from_pretrained(tmp_path / "m")

    bad = dict(state)
    bad["layers.0.extra.weight"] = torch.zeros(3)
    save_file(bad, f)
    with pytest.raises(KeyError, match="layers.0.extra.weight"):
        Transformer.from_pretrained(tmp_path / "m")

    bad = dict(state)
    bad["norm.weight"] = torch.zeros(65)
    save_file(bad, f)
    with pytest.raises(ValueError, match="norm.weight"):
        Transformer.from_pretrained(tmp_path / "m")

    save_file(state, f)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_heads_typo"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="n_heads_typo"):
        Transformer.from_pretrained(tmp_path / "m")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path / "m")
    # the old checkpoint is intact and no temporary directory is left
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,
    "yi-6b": 6_061_035_520,
    "yi-34b": 34_388_917_248,
    "qwen1.5-14b": 14_167_290_880,
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset))
    assert model.num_params() == PUBLISHED[preset]


@pytest.mark.parametrize("mode", ["full", "pesc", "pesc+lora", "lora", "lora q,v"])
def test_flops_per_token_counts_the_matmuls_autograd_runs(mode, monkeypatch):
    """flops_per_token against torch's FLOP counter over a real forward + backward. The counter
    does not see the CPU's fused attention kernel (and its GPU ones by another convention), so
    the attention terms are added by hand:
    4 * T * heads * head_dim per layer forward, 3x with backward, and PESC alone leaves the
    first layer's attention without a backward (nothing trained below it)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    net = Transformer(cfg)
    if mode.startswith("pesc"):
        upcycle(net, PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0))
        if mode == "pesc+lora":
            add_lora(net, LoRAConfig(rank=4, dropout=0.0))
    elif mode.startswith("lora"):
        net.requires_grad_(False)
        add_lora(net, LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=LoRAConfig.targets if mode == "lora"
                                 else ("q", "v")))
    monkeypatch.setattr(moe, "adapter_experts", moe.adapter_experts_loop)  # no padded tiles to count
    B, T = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # the fused LoRA accumulates into its outputs with the in-place addmm_, which the counter
    # does not know: it costs what addmm does
    def addmm_(c_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):  # C += A @ B
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as counter:
        net(idx, idx)[1].backward()
    attention = 4 * T * cfg.n_heads * cfg.head_dim * (3 * cfg.n_layers - (2 if mode == "pesc" else 0))
    # on CUDA the counter does see SDPA's kernels (by its own backward convention): left out for ours
    sdpa = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items() if "scaled_dot_product" in str(op))
    counted = counter.get_total_flops() - sdpa
    assert net.flops_per_token(T) * B * T == pytest.approx(counted + attention * B * T, rel=1e-12)
    assert_close(net.estimate_mfu(1000.0, T, 1e12), net.flops_per_token(T) * 1000 / 1e12)  # a product and a quotient


def test_peak_flops_table():
    assert model.peak_flops("cpu") is None
    for gpu, table in model.PEAK_FLOPS.items():
        assert set(table) == {torch.bfloat16, torch.float16, "tf32", torch.float32}, gpu
        assert table[torch.bfloat16] == table[torch.float16] > table["tf32"] > table[torch.float32], gpu


def test_whole_model_kernels_match_torch_path(monkeypatch):
    """A tiny PESC model run with every Triton kernel (interpreted on the CPU) equals the
    plain PyTorch path: loss and gradients of every trainable tensor (fp32; the kernels
    accumulate in another order, so they agree to rounding, not exactly)."""
    import moe

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layers=1, qkv_bias=True)
    model = moe.upcycle(Transformer(cfg), moe.PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0))
    moe.add_lora(model, moe.LoRAConfig(rank=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.randint(0, cfg.vocab_size, (2, 9))
    targets[0, :3] = -100

    def run(mode):
        monkeypatch.setenv("PESC_KERNELS", mode)
        model.zero_grad()
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_t, grads_t = run("torch")
    loss_k, grads_k = run("triton")
    reduction = model_reduction(cfg, backward=True)
    assert_close(loss_k, loss_t, reduction=reduction, name="loss")
    for name in grads_t:
        assert_close(grads_k[name], grads_t[name], reduction=reduction, name=name)


def test_fused_lm_head_loss_follows_autocast(monkeypatch):
    """Under bf16 autocast the plain path's LM head (F.linear) runs in bf16; the fused kernel writes its
    matmuls into buffers, which autocast does not reach, so kernels.linear_cross_entropy casts
    like F.linear would. Full training (fp32 weights) on a GPU is where this matters; here the
    interpreter stands in."""
    import kernels

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layers=1)
    model = Transformer(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 9)), torch.randint(0, cfg.vocab_size, (2, 9))
    seen, fused = [], kernels._LinearCrossEntropy.apply

    def spy(h, weight, *rest):
        seen.append((h.dtype, weight.dtype))
        return fused(h, weight, *rest)

    monkeypatch.setattr(kernels._LinearCrossEntropy, "apply", spy)
    losses = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("PESC_KERNELS", mode)
        with torch.autocast(idx.device.type, dtype=torch.bfloat16):
            losses[mode] = model(idx, targets)[1].item()
            logits = model(idx)[0]
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # what fails if the kernel does not cast
    # Both sides round the same bf16 products' fp32 sums to bf16 logits, but in another order, so a
    # logit may land one bf16 step away; the loss (a log-sum-exp minus a logit) moves by at most
    # twice the logits' error. An fp32 LM head is within bf16 rounding too: the spy above checks that.
    assert_close(losses["triton"], losses["torch"], dtype=torch.bfloat16, ulps=8.0, scale=logits.abs().max())
