"""quant.py: the NF4 format against an independent NumPy reading and bitsandbytes, the kernel
against its twin, the frozen NF4 linear, quantized loading, QLoRA training and export, and the
official trainer's output (PEFT LoRA + moe_model.bin) imported by convert.py."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tolerance import assert_close

import convert
import moe
import quant
import sample
import train
from model import LMHead, ModelConfig, Transformer
from test_train import tiny_base

# -----------------------------------------------------------------------------------------------
# The format, as bitsandbytes stores it (quant.py writes it down), read independently in NumPy

LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                   -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                   0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                   0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def numpy_dynamic_map():
    """Signed dynamic 8-bit map: per exponent e in 0..6, 2^e midpoints of a grid on [0.1, 1] times
    10^(e-6), both signs, plus 0 and 1 (NumPy's linspace rounds once, so only to fp32 rounding)."""
    values = [0.0, 1.0]
    for e in range(7):
        grid = np.linspace(0.1, 1, 2**e + 1)
        mids = (grid[:-1] + grid[1:]) / 2 * 10.0 ** (e - 6)
        values += list(mids) + list(-mids)
    return np.sort(np.array(values, dtype=np.float32))


def numpy_nearest(x, table):
    """Index of the nearest table entry; a value on a midpoint takes the lower one."""
    mid = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
    return np.searchsorted(mid, x, side="left")


def numpy_blocks(flat, blocksize):
    """(absmax per block, values scaled into [-1, 1]): full blocks times the fp32 reciprocal, the
    partial block divided."""
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    scaled = (blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None]).reshape(-1)
    if full < n:
        last = np.abs(flat[full:]).max()
        absmax = np.append(absmax, last)
        scaled = np.append(scaled, flat[full:] / np.maximum(last, np.float32(1e-38)))
    return absmax.astype(np.float32), np.clip(scaled, -1, 1).astype(np.float32)


def weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if w.numel() > 256:
        w.view(-1)[:64] = 0  # an all-zero block
        w.view(-1)[200] = 0.5  # an outlier block
    return w


SHAPES = [((96, 200), torch.float32), ((33, 77), torch.bfloat16), ((129, 257), torch.float16), ((7, 5), torch.float32)]


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_format_matches_numpy_reading(shape, dtype):
    w = weights(shape, dtype, 0)
    p = quant.quantize_nf4(w)
    flat = w.float().numpy().reshape(-1)
    absmax, scaled = numpy_blocks(flat, 64)
    codes = numpy_nearest(scaled, LEVELS)
    unpacked = np.stack([p.codes.numpy() >> 4, p.codes.numpy() & 15], axis=1).reshape(-1)
    assert np.array_equal(unpacked[:flat.size], codes)  # high nibble first
    if flat.size % 2:
        assert unpacked[-1] == 7  # the pad is the value 0
    assert p.codes.numel() == (flat.size + 1) // 2
    # double quantization: the offset is a float mean (summation order may differ by rounding)
    assert_close(p.absmax_offset, torch.tensor(absmax.mean(dtype=np.float64), dtype=torch.float32),
                 reduction=absmax.size, name="offset")
    scale, scaled_absmax = numpy_blocks(absmax - p.absmax_offset.numpy(), 256)
    assert np.array_equal(p.absmax_scale.numpy(), scale)
    assert np.array_equal(p.absmax.numpy(), numpy_nearest(scaled_absmax, quant.DYNAMIC_MAP.numpy()))
    # without double quantization the absmaxes stay fp32
    assert np.array_equal(quant.quantize_nf4(w, double_quant=False).absmax.numpy(), absmax)


def test_dynamic_map():
    m = quant.DYNAMIC_MAP
    assert m.shape == (256,) and torch.equal(m, m.sort().values)
    assert_close(m, torch.from_numpy(numpy_dynamic_map()), dtype=torch.float32, name="map")


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_matches_bitsandbytes(shape, dtype):
    bnb = pytest.importorskip("bitsandbytes.functional")  # in requirements-dev.txt: CI runs this
    w = weights(shape, dtype, 1)
    assert torch.equal(quant.DYNAMIC_MAP, bnb.create_dynamic_map(signed=True))
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    p = quant.quantize_nf4(w, double_quant=False)
    assert torch.equal(p.codes, q.view(-1)) and torch.equal(p.absmax, state.absmax)
    assert torch.equal(quant.dequantize_torch(p, dtype), bnb.dequantize_4bit(q, state))

    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    p = quant.quantize_nf4(w)
    assert torch.equal(p.codes, q.view(-1))
    assert torch.equal(p.absmax_offset, state.offset) and torch.equal(p.absmax_scale, state.state2.absmax)
    # bitsandbytes' fp32 CPU 8-bit quantizer is a C++ approximate search that takes the neighbouring
    # code for ~0.2% of the values; its exact nearest-entry path (the op on fp64 input) is the oracle
    exact, scale = torch.ops.bitsandbytes.quantize_blockwise(
        (quant.quantize_nf4(w, double_quant=False).absmax - state.offset).double(),
        bnb.create_dynamic_map(signed=True), 256)
    assert torch.equal(p.absmax_scale, scale)
    nonzero = scale.repeat_interleave(256)[:exact.numel()] > 0  # that path computes 0 * inf for a 0 scale
    assert torch.equal(p.absmax[nonzero], exact[nonzero]) and nonzero.any() == (w.numel() > 64)
    assert ((p.absmax.long() - state.absmax.long())[nonzero].abs() <= 1).all()


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_bound(double_quant):
    """|w - dequantize(quantize(w))| <= absmax * (half the widest level gap) + the absmax's own error."""
    w = weights((300, 130), torch.float32, 2)
    p = quant.quantize_nf4(w, double_quant=double_quant)
    true_absmax = quant.quantize_nf4(w, double_quant=False).absmax
    absmax_err = torch.zeros_like(true_absmax)
    if double_quant:  # absmax = map[code] * scale + offset: off by at most half a map gap times the scale
        scale = p.absmax_scale.repeat_interleave(256)[:true_absmax.numel()]
        absmax_err = scale * quant.DYNAMIC_MAP.diff().max() / 2
    half_gap = quant.NF4_LEVELS.diff().max() / 2
    bound = (true_absmax * half_gap + absmax_err) * (1 + 1e-5) + 1e-12  # + fp32 rounding of the products
    err = (quant.dequantize_nf4(p) - w).abs().reshape(-1)
    n = w.numel()
    per_block = F.pad(err, (0, -n % 64)).view(-1, 64).amax(1)
    assert (per_block <= bound).all()
    assert (per_block / bound).max() > 0.5  # the bound is tight, not vacuous
    assert torch.equal(quant.dequantize_nf4(p).view(-1)[:64], torch.zeros(64))  # the zero block stays zero


# -----------------------------------------------------------------------------------------------
# The kernel and the frozen linear


@pytest.mark.parametrize("shape,double_quant", [((37, 91), True), ((300, 256), True), ((5, 3), False),
                                                ((70000,), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_twin(shape, double_quant, dtype, monkeypatch):
    p = quant.quantize_nf4(weights(shape, torch.float32, 3), double_quant=double_quant)
    monkeypatch.setenv("PESC_KERNELS", "triton")
    got = quant.dequantize_nf4(p, dtype)
    monkeypatch.setenv("PESC_KERNELS", "torch")
    want = quant.dequantize_nf4(p, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    # the same fp32 products; the Triton interpreter's fp32 -> bf16 store truncates instead of rounding (one ulp)
    assert_close(got, want, dtype=dtype, name="nf4 dequantize")


def test_nf4_linear_forward_backward(monkeypatch):
    """Equal to F.linear with the dequantized weight, kernel and twin; only dx; no weight saved."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 72, bias=True)
    nf4 = quant.NF4Linear.from_linear(lin)
    w = quant.dequantize_torch(nf4.packed)
    x = torch.randn(3, 5, 96, requires_grad=True)
    g = torch.randn(3, 5, 72)
    ref = F.linear(x, w, lin.bias)
    dx_ref, = torch.autograd.grad(ref, x, g)
    saved = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("PESC_KERNELS", mode)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = nf4(x)
        dx, = torch.autograd.grad(out, x, g)
        assert_close(out, ref, reduction=96, name=f"{mode} forward")
        assert_close(dx, dx_ref, reduction=72, name=f"{mode} dx")
    assert w.numel() not in saved  # nothing weight-sized is kept: backward dequantizes again
    assert not nf4.bias.requires_grad and list(nf4.parameters()) == [nf4.bias]
    assert nf4.state_dict().keys() == {"bias"}  # the quantized base is never saved


def test_nf4_linear_autocast_and_to():
    torch.manual_seed(0)
    nf4 = quant.NF4Linear.from_linear(torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nf4(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, F.linear(x.bfloat16(), quant.dequantize_torch(nf4.packed, torch.bfloat16)),
                 dtype=torch.bfloat16, reduction=64)
    scale = nf4.absmax_scale.clone()
    nf4.to(torch.bfloat16)  # the fp32 scales must not be rounded
    assert nf4.absmax_scale.dtype == torch.float32 and torch.equal(nf4.absmax_scale, scale)



@pytest.mark.parametrize("shape, double_quant, dtype", [((72, 96), True, torch.uint8), ((5, 129), True, torch.bfloat16),
                                                        ((33, 64), False, torch.float16)])
def test_nf4_linear_flattened_for_fsdp(shape, double_quant, dtype):
    """flatten_ (what FSDP2 shards): the packed bytes in one frozen parameter, the same weight,
    forward and input gradient bit for bit; its size as packed_nbytes says; never converted."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0], bias=True)
    a = quant.NF4Linear.from_linear(lin, double_quant=double_quant)
    b = quant.NF4Linear.from_linear(lin, double_quant=double_quant).flatten_(dtype)
    assert b.storage.dtype == dtype and not b.storage.requires_grad and not list(b.buffers())
    assert b.storage.nbytes == quant.packed_nbytes(shape, double_quant=double_quant, aligned=True)
    assert a.packed.nbytes() == quant.packed_nbytes(shape, double_quant=double_quant)
    for t, u in zip(a.packed.tensors(), b.packed.tensors()):
        assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u)
    b.to(torch.float32)  # a dtype cast moves nothing but the bias: the bytes stay as they are
    moe.cast_for_training(b, torch.float32)
    assert b.storage.dtype == dtype
    x = torch.randn(4, shape[1], requires_grad=True)
    g = torch.randn(4, shape[0])
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a, out_b)
    assert torch.equal(*(torch.autograd.grad(o, x, g)[0] for o in (out_a, out_b)))

def test_lora_on_nf4():
    """LoRALinear / add_lora / merge_lora over an NF4 base: W_nf4 x + (alpha/r) B A x."""
    torch.manual_seed(0)
    nf4 = quant.NF4Linear.from_linear(torch.nn.Linear(64, 48, bias=False))
    holder = torch.nn.Module()
    holder.wq, holder.config = nf4, ModelConfig.from_preset("tiny")  # add_lora records LoRA in config.lora
    moe.add_lora(holder, moe.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q",)))
    lora = holder.wq
    assert isinstance(lora, moe.LoRALinear) and lora.base is nf4
    torch.nn.init.normal_(lora.lora_b)
    x = torch.randn(6, 64, requires_grad=True)
    w = quant.dequantize_torch(nf4.packed)
    want = x @ w.T + 2.0 * (x @ lora.lora_a.T) @ lora.lora_b.T
    out = lora(x)
    assert_close(out, want, reduction=64, name="lora forward")
    out.sum().backward()
    assert lora.lora_a.grad is not None and lora.lora_b.grad is not None
    moe.merge_lora(holder)
    assert type(holder.wq) is torch.nn.Linear and holder.config.lora is None
    assert_close(holder.wq(x), want, reduction=64, name="merged")


# -----------------------------------------------------------------------------------------------
# Quantized loading


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("quant"))


QUANTIZED = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen"])
def test_from_pretrained_quantize(preset, tmp_path):
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset(preset)).save_pretrained(str(tmp_path / "m"))
    q = Transformer.from_pretrained(str(tmp_path / "m"), quantize="nf4")
    dense = Transformer.from_pretrained(str(tmp_path / "m"))
    file = load_file(str(tmp_path / "m" / "model.safetensors"))
    names = {n.rsplit(".", 1)[-1] for n, m in q.named_modules() if isinstance(m, quant.NF4Linear)}
    assert names == QUANTIZED
    for n, m in q.named_modules():
        if isinstance(m, quant.NF4Linear):
            assert torch.equal(m.codes, quant.quantize_nf4(file[n + ".weight"]).codes)
            dense.get_submodule(n).weight.data = quant.dequantize_torch(m.packed)
    assert type(q.output) is LMHead and type(q.tok_embeddings) is torch.nn.Embedding
    idx = torch.randint(0, 512, (2, 11))
    c = q.config
    assert_close(q(idx)[0], dense(idx)[0], reduction=c.ffn_dim * c.n_layers, name="quantized logits")
    assert q.num_params() == dense.num_params()


def test_from_pretrained_quantize_errors(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "m")
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(path)
    with pytest.raises(ValueError, match="quantize='int8'"):
        Transformer.from_pretrained(path, quantize="int8")
    state = load_file(os.path.join(path, "model.safetensors"))
    key = "layers.0.attention.wq.weight"
    state[key] = torch.zeros_like(state[key], dtype=torch.uint8)
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight.*already quantized"):
        Transformer.from_pretrained(path, quantize="nf4")
    state[key] = torch.zeros_like(state[key], dtype=torch.float32)
    state[key + ".absmax"] = torch.zeros(4)  # a bitsandbytes-style quantized checkpoint
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(KeyError, match="already quantized"):
        Transformer.from_pretrained(path, quantize="nf4")
    lora = moe.add_lora(moe.upcycle(Transformer(ModelConfig.from_preset("tiny")), moe.PESCConfig(adapter_dim=4)),
                        moe.LoRAConfig(rank=2))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="unmerged LoRA"):
        Transformer.from_pretrained(str(tmp_path / "lora"), quantize="nf4")


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="already quantized"):
        quant.quantize_nf4(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no elements"):
        quant.quantize_nf4(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="blocksize 48"):
        quant.quantize_nf4(torch.zeros(64), blocksize=48)
    p = quant.quantize_nf4(torch.randn(10, 64))
    bad = quant.NF4Weight(p.codes[:-1], p.absmax, p.absmax_scale, p.absmax_offset, p.shape)
    with pytest.raises(ValueError, match="codes has 319 values, the format needs 320"):
        quant.dequantize_nf4(bad)


# -----------------------------------------------------------------------------------------------
# QLoRA training, export, sampling


def qlora_options(env, out, *extra):
    return ["--ckpt", env["base"], "--data", env["data"], "--out_dir", str(out), "--device", "cpu",
            "--num_experts", "4", "--experts_per_token", "2", "--adapter_dim", "8", "--lora_rank", "4",
            "--lora_dropout", "0",
            "--adapter_dropout", "0", "--seq_len", "64", "--batch_size", "4", "--grad_accum_steps", "1",
            "--max_iters", "12", "--lr", "2e-2", "--warmup_iters", "0", "--log_interval", "1",
            "--eval_interval", "0", "--save_interval", "0", "--val_fraction", "0.1", "--quantize", "nf4", *extra]


def test_qlora_train_export(base):
    out = base["dir"] / "qlora"
    result = train.train(*train.parse_args(qlora_options(base, out)))
    with open(out / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1, losses
    assert result["val_loss"] is not None

    # the training state holds only what was trained (LoRA, routers, adapters), never the base
    trained = load_file(str(out / "train_state" / "trainable.safetensors"))
    assert all(k.endswith(("lora_a", "lora_b", "router.weight", "adapter_down", "adapter_up")) for k in trained)
    assert any(k.endswith("lora_a") for k in trained)

    # the export: the full-precision base with the LoRA merged, the keys an unquantized run writes
    exported = load_file(str(out / "model.safetensors"))
    base_file = load_file(os.path.join(base["base"], "model.safetensors"))
    assert all(t.is_floating_point() for t in exported.values())
    cfg = moe.PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0)
    lora = moe.LoRAConfig(rank=4, alpha=16.0, dropout=0.0)
    ref = moe.add_lora(moe.upcycle(Transformer.from_pretrained(base["base"]), cfg), lora)
    assert set(exported) == set(moe.merge_lora(moe.add_lora(moe.upcycle(Transformer.from_pretrained(base["base"]),
                                                                         cfg), lora)).state_dict())
    ref.load_state_dict({**ref.state_dict(), **trained}, strict=True)
    key = "layers.1.feed_forward.w2.weight"
    delta = 16.0 / 4 * (trained[key[:-7] + ".lora_b"] @ trained[key[:-7] + ".lora_a"])
    assert torch.equal(exported[key], base_file[key] + delta)  # merged into the file's values
    assert not torch.equal(exported[key], base_file[key])
    moe.merge_lora(ref)
    got = Transformer.from_pretrained(str(out)).eval()
    idx = torch.randint(0, 512, (2, 13))
    c = got.config
    assert_close(got(idx)[0], ref.eval()(idx)[0], reduction=c.ffn_dim * c.n_layers, name="exported logits")


def test_quantize_full_mode_refused(base):
    with pytest.raises(ValueError, match="--mode full"):
        train.train(*train.parse_args(qlora_options(base, base["dir"] / "full", "--mode", "full")))


def test_sample_quantize(base, capsys):
    sample.main(["--ckpt", base["base"], "--prompt", "add 3", "--max_new_tokens", "6", "--temperature", "0",
                 "--quantize", "nf4", "--device", "cpu"])
    printed = capsys.readouterr()
    model = Transformer.from_pretrained(base["base"], quantize="nf4").eval()
    tok = sample.Tokenizer(base["base"])
    ids = tok.encode("add 3", bos=True)
    row = sample.generate(model, torch.tensor([ids]), 6, temperature=0)[0].tolist()
    assert tok.decode(row[len(ids):]) in printed.out
    assert "nf4" in printed.err + printed.out


# -----------------------------------------------------------------------------------------------
# The official trainer's output: checkpoint-N/adapter_model (PEFT) + moe_model.bin

PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def official(base):
    """The tiny base as an HF checkpoint, and a training output in the official trainer's layout:
    a PEFT LoRA written by peft itself on the HF model, and moe_model.bin with random experts."""
    peft = pytest.importorskip("peft")  # in requirements-dev.txt: CI runs this
    transformers = pytest.importorskip("transformers")
    d = base["dir"] / "official"
    hf_dir = str(d / "hf")
    convert.export_hf(base["base"], hf_dir)
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=PEFT_MODULES))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ckpt = d / "checkpoint-10"
    lora.save_pretrained(str(ckpt / "adapter_model"))
    merged = {k: v.clone() for k, v in lora.merge_and_unload().state_dict().items()}
    c = ModelConfig.from_preset("tiny")
    E, r = 4, 8
    experts = {}
    for i in range(c.n_layers):
        p = f"base_model.model.model.layers.{i}.mlp.moe_adapter."
        experts[p + "router.weight"] = torch.randn(E, c.dim)
        for e in range(E):
            experts[p + f"experts.expert_{e}.adapter_down.weight"] = torch.randn(r, c.dim) * 0.1
            experts[p + f"experts.expert_{e}.adapter_up.weight"] = torch.randn(c.dim, r) * 0.1
    torch.save(experts, str(ckpt / "moe_model.bin"))
    return {"hf": hf_dir, "ckpt": str(ckpt), "merged": merged, "experts": experts, "E": E, "r": r}


def test_training_output_import(official, base, tmp_path):
    out = str(tmp_path / "pesc")
    convert.main(["--ckpt", official["hf"], "--training_output", official["ckpt"], "--out_dir", out,
                  "--experts_per_token", "2", "--adapter_scaling", "0.25"])
    got = Transformer.from_pretrained(out).eval()
    m = got.config.moe
    assert (m.num_experts, m.adapter_dim, m.top_k, m.adapter_scaling) == (official["E"], official["r"], 2, 0.25)
    # the reference: peft's own merge of the LoRA, the experts placed by hand
    ref = Transformer.from_pretrained(base["base"])
    with torch.no_grad():
        for name, t in official["merged"].items():
            key = convert.hf_key_to_project(name)
            if key is not None and key != "output.weight":
                ref.get_submodule(key.rsplit(".", 1)[0]).weight.copy_(t)
        moe.upcycle(ref, moe.PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_scaling=0.25))
        for i, layer in enumerate(ref.layers):
            p = f"base_model.model.model.layers.{i}.mlp.moe_adapter."
            ff = layer.feed_forward
            ff.router.weight.copy_(official["experts"][p + "router.weight"])
            for e in range(4):
                ff.adapter_down[e] = official["experts"][p + f"experts.expert_{e}.adapter_down.weight"]
                ff.adapter_up[e] = official["experts"][p + f"experts.expert_{e}.adapter_up.weight"]
    idx = torch.randint(0, 512, (2, 9))
    c = got.config
    assert_close(got(idx)[0], ref.eval()(idx)[0], reduction=c.ffn_dim * c.n_layers, name="imported logits")
    # the LoRA did change the base, so the merge is tested
    plain = Transformer.from_pretrained(base["base"])
    assert not torch.equal(got.layers[0].attention.wq.weight, plain.layers[0].attention.wq.weight)


def copy_output(official, tmp_path):
    import shutil

    dst = tmp_path / "checkpoint-10"
    shutil.copytree(official["ckpt"], dst)
    return dst


def edit_adapter_config(ckpt, **changes):
    path = ckpt / "adapter_model" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_training_output_errors(official, tmp_path, capsys):
    def fails(ckpt, match, *extra):
        with pytest.raises(SystemExit):
            convert.main(["--ckpt", official["hf"], "--training_output", str(ckpt), "--out_dir", str(tmp_path / "o"),
                          *extra])
        err = capsys.readouterr().err
        assert match in err, err
        assert not (tmp_path / "o").exists()

    flags = ("--experts_per_token", "2", "--adapter_scaling", "0.25")
    fails(official["ckpt"], "needs --experts_per_token and --adapter_scaling", "--experts_per_token", "2")
    fails(official["ckpt"], "needs --experts_per_token and --adapter_scaling", "--adapter_scaling", "1")
    fails(tmp_path / "nowhere", "no such directory", *flags)

    ckpt = copy_output(official, tmp_path)
    (ckpt / "moe_model.bin").rename(ckpt / "moved.bin")
    fails(ckpt, "moe_model.bin: missing", *flags)
    (ckpt / "moved.bin").rename(ckpt / "moe_model.bin")

    edit_adapter_config(ckpt, r=8)  # the tensors have rank 4
    fails(ckpt, "rank r=8", *flags)
    edit_adapter_config(ckpt, r=4, target_modules=["q_proj", "v_proj"])  # the tensors cover all seven
    fails(ckpt, "not among", *flags)
    edit_adapter_config(ckpt, target_modules=PEFT_MODULES)

    experts = dict(official["experts"])
    key = "base_model.model.model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_up.weight"
    experts[key] = torch.zeros(64, 16)  # adapter dim 16, the others 8
    torch.save(experts, str(ckpt / "moe_model.bin"))
    fails(ckpt, "expert_3.adapter_up.weight' has shape (64, 16)", *flags)
    del experts[key]
    torch.save(experts, str(ckpt / "moe_model.bin"))
    fails(ckpt, f"no tensor '{key}'", *flags)

    weights_file = ckpt / "adapter_model" / "adapter_model.safetensors"
    lora = load_file(str(weights_file))
    lora.pop(next(k for k in lora if "layers.1.mlp.down_proj.lora_A" in k))
    save_file(lora, str(weights_file))
    fails(ckpt, "no tensor 'base_model.model.model.layers.1.mlp.down_proj.lora_A.weight'", *flags)
