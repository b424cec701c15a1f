"""The paths a GPU takes (grouped GEMMs, FlexAttention, compiled blocks and decode, fused LoRA),
run on the CPU and held equal to the plain twins they replace."""

import os

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

import moe
from moe import adapter_experts_grouped, adapter_experts_loop, route

# -----------------------------------------------------------------------------
# Adapters as grouped GEMMs vs the reference loop


def adapter_case(N, D, E, r, k, seed, dtype=torch.float32, experts=None):
    """Output and gradients (y, routing weights, down, up) of one adapter call under fn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(N, E, generator=g)
    down = (torch.randn(E, r, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    up = (torch.randn(E, D, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    proj = torch.randn(N, D, generator=g).to(dtype)
    weights, chosen = route(logits, k)
    if experts is not None:
        chosen = experts
    weights.requires_grad_()

    def run(fn, **kw):
        out = fn(y, weights, chosen, down, up, 0.5, **kw)
        return (out, *torch.autograd.grad((out * proj).sum(), [y, weights, down, up]))
    return run


def assert_adapters_equal(fast, ref, dtype, D, r):
    for name, a, b, reduction in zip(["out", "y", "weights", "down", "up"], fast, ref, [D + r, D + r, D, 37, 37]):
        assert_close(a, b, dtype=dtype, reduction=reduction, ulps=8, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (16, 4)])
def test_grouped_adapters_match_loop(E, k, dtype):
    N, D, r = 37, 32, 16
    run = adapter_case(N, D, E, r, k, seed=E + k, dtype=dtype)
    assert_adapters_equal(run(adapter_experts_grouped), run(adapter_experts_loop), dtype, D, r)


@pytest.mark.parametrize("chosen", [[3], [3, 5], [0, 7]])
def test_grouped_adapters_empty_experts_and_one_expert(chosen):
    # every token on one expert (k=1) or two; the other experts are empty groups, also the first
    # and the last (their group ends equal their neighbours')
    N, D, E, r, k = 29, 16, 8, 8, len(chosen)
    experts = torch.tensor([chosen] * N)
    run = adapter_case(N, D, E, r, k, seed=5, experts=experts)
    fast = run(adapter_experts_grouped)
    assert_adapters_equal(fast, run(adapter_experts_loop), torch.float32, D, r)
    unused = [e for e in range(E) if e not in chosen]
    assert torch.equal(fast[3][unused], torch.zeros_like(fast[3][unused]))  # no gradient, not garbage
    assert torch.equal(fast[4][unused], torch.zeros_like(fast[4][unused]))


def test_grouped_adapters_dropout_mask_as_loop():
    run = adapter_case(40, 16, 4, 8, 2, seed=7)
    torch.manual_seed(123)
    fast = run(adapter_experts_grouped, dropout_p=0.3, training=True)
    torch.manual_seed(123)
    assert_adapters_equal(fast, run(adapter_experts_loop, dropout_p=0.3, training=True), torch.float32, 16, 8)


def test_grouped_path_is_chosen_only_where_it_is_fast(monkeypatch):
    y, down = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(2, 8, 16, dtype=torch.bfloat16)
    assert not moe.grouped_mm_fused(y, down)  # a CPU tensor: no fused kernel
    assert moe.adapter_path(y, down) == "sorted"  # training: the sorted path's backward
    with torch.device("meta"):  # plan.py's trace
        assert moe.adapter_path(torch.empty(4, 16), torch.empty(2, 8, 16)) == "sorted"
    with torch.no_grad():
        assert moe.adapter_path(y, down) == "grouped"  # generation on the CPU
        monkeypatch.setenv("PESC_KERNELS", "triton")  # the tests interpret the kernels on the CPU
        assert moe.adapter_path(y, down) == "triton"


def test_generation_on_the_cpu_takes_the_grouped_path_and_equals_the_loop():
    g = torch.Generator().manual_seed(4)
    y, logits = torch.randn(37, 32, generator=g), torch.randn(37, 8, generator=g)
    down, up = torch.randn(8, 16, 32, generator=g) / 32**0.5, torch.randn(8, 32, 16, generator=g) / 16**0.5
    weights, experts = route(logits, 2)
    with torch.no_grad():
        fast = moe.adapter_experts(y, weights, experts, down, up, 0.5)
    assert_close(fast, adapter_experts_loop(y, weights, experts, down, up, 0.5), reduction=32 + 16, name="out")


# -----------------------------------------------------------------------------
# Packed rows: FlexAttention's block mask vs the dense (B, T, T) mask


def packed_doc_ids(T, lengths_per_row):
    """(B, T) doc ids, each row its documents of the given lengths, then padding (-1)."""
    rows = []
    for lengths in lengths_per_row:
        ids = [d for d, n in enumerate(lengths) for _ in range(n)]
        rows.append(ids + [-1] * (T - len(ids)))
    return torch.tensor(rows)


@pytest.mark.parametrize("window", [None, 7])
def test_block_mask_matches_dense_mask_forward_and_backward(window, monkeypatch):
    import torch.nn.attention.flex_attention as flex

    import model
    from data import attention_inputs
    from model import ModelConfig, Transformer

    # FlexAttention refuses gradients on the CPU in its front door only; its unfused reference
    # (what torch falls back to) has a backward, which is what is checked here
    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
    T = 40
    doc_ids = packed_doc_ids(T, [[40], [17, 23], [3, 9, 1, 12, 5, 6], [11, 20]])  # 1, 2, many docs, padding
    config = ModelConfig.from_preset("tiny", sliding_window=window)
    torch.manual_seed(0)
    net = Transformer(config)
    idx = torch.randint(0, config.vocab_size, doc_ids.shape)
    kw = attention_inputs(doc_ids)
    masks = []
    block_mask = model.document_block_mask

    def run(flex_on):
        monkeypatch.setattr(model, "use_flex_attention", lambda x: flex_on)
        monkeypatch.setattr(model, "document_block_mask", lambda *a: masks.append(block_mask(*a)) or masks[-1])
        net.zero_grad()
        logits = net(idx, **kw).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return logits, [p.grad.clone() for p in net.parameters()]

    ref_logits, ref_grads = run(False)
    assert not masks  # the dense mask
    logits, grads = run(True)
    assert len(masks) == 1 and not isinstance(masks[0], torch.Tensor)  # one BlockMask for all layers
    reduction = config.n_layers * (config.ffn_dim + T)
    assert_close(logits, ref_logits, reduction=reduction, name="logits")
    for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
        assert_close(g, r, reduction=reduction * 4 * T, name=name)


# -----------------------------------------------------------------------------
# Compiled: regional compilation of training, the compiled decode step
# (aot_eager: Dynamo's capture and AOT autograd as inductor gets them, without compiling C++,
# which takes minutes on this CPU; fullgraph=True fails on any graph break)


def tiny_pesc_lora():
    from model import ModelConfig, Transformer
    from moe import LoRAConfig, PESCConfig

    torch.manual_seed(0)
    pesc = PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0)
    net = Transformer(ModelConfig.from_preset("tiny", n_layers=3, moe=pesc, lora=LoRAConfig(rank=4, dropout=0.0)))
    with torch.no_grad():  # trained-looking adapters and LoRA (both start at zero)
        for name, p in net.named_parameters():
            if "adapter_up" in name or "lora_b" in name:
                p.normal_(0, 0.02)
    return net


def test_compiled_blocks_equal_loss_and_gradients():
    import copy

    import torch._dynamo

    import train
    from data import attention_inputs

    net = tiny_pesc_lora()
    compiled = copy.deepcopy(net)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train.compile_blocks(compiled, backend="aot_eager", fullgraph=True)
    assert list(compiled.state_dict()) == list(net.state_dict())  # no _orig_mod. prefixes
    idx = torch.randint(0, net.config.vocab_size, (2, 32))
    kw = attention_inputs(torch.tensor([[0] * 12 + [1] * 20, [0] * 32]))  # a packed row
    results = []
    for m in (net, compiled):
        _, loss = m(idx, idx, **kw)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (c_loss, c_grads) = results
    assert_close(c_loss, loss, reduction=3 * net.config.ffn_dim, name="loss")
    for name, g in grads.items():
        assert_close(c_grads[name], g, reduction=3 * net.config.ffn_dim * 64, name=name)
    # the first block's input needs no gradient (a frozen embedding): one graph for it, one reused
    # by the other two
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_decode_step_equal_greedy_tokens():
    import torch._dynamo

    from sample import compile_decode_step, generate

    net = tiny_pesc_lora().eval()
    prompts = [[1, 5, 9, 33, 7], [2, 8]]  # left-padded to one length
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = compile_decode_step("cpu", backend="aot_eager")
    for n in (12, 20):  # two calls of different lengths: one static cache size, no recompile
        eager = generate(net, prompts, n, temperature=0)
        compiled = generate(net, prompts, n, temperature=0, decode_fn=step, static_cache=True)
        assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# -----------------------------------------------------------------------------
# LoRA with the scale and add inside the matmuls vs the plain twin


@pytest.mark.parametrize("dropout,bias,frozen", [(0.0, False, True), (0.0, True, False), (0.3, True, True)])
def test_fused_lora_matches_plain(dropout, bias, frozen):
    g = torch.Generator().manual_seed(0)
    D_in, D_out, r = 48, 40, 8
    x = torch.randn(3, 7, D_in, generator=g, requires_grad=True)
    weight = torch.randn(D_out, D_in, generator=g).requires_grad_(not frozen)
    b = torch.randn(D_out, generator=g).requires_grad_(not frozen) if bias else None
    lora_a = torch.randn(r, D_in, generator=g).requires_grad_()
    lora_b = torch.randn(D_out, r, generator=g).requires_grad_()
    proj = torch.randn(3, 7, D_out, generator=g)
    wrt = [t for t in (x, weight, b, lora_a, lora_b) if t is not None and t.requires_grad]

    def run(fn):
        torch.manual_seed(1)
        x_drop = F.dropout(x, dropout, training=True) if dropout else x
        out = fn(x, x_drop, weight, b, lora_a, lora_b, 2.0)
        return [out, *torch.autograd.grad((out * proj).sum(), wrt)]

    for a, e in zip(run(moe.lora_linear), run(moe.lora_linear_plain)):
        assert_close(a, e, reduction=D_in + D_out + 21)


def test_fused_lora_under_bf16_autocast_matches_plain():
    layer = moe.LoRALinear(torch.nn.Linear(32, 24, bias=False).requires_grad_(False), 8, 16.0, 0.0)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(5, 32, requires_grad=True)
    grads = []
    for fn in (moe.lora_linear, moe.lora_linear_plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, x, layer.weight, None, layer.lora_a, layer.lora_b, layer.scale)
        assert out.dtype == torch.bfloat16
        grads.append([out, *torch.autograd.grad(out.float().sum(), [x, layer.lora_a, layer.lora_b])])
    for a, e in zip(*grads):
        assert a.dtype == e.dtype
        assert_close(a.float(), e.float(), dtype=torch.bfloat16, reduction=32, ulps=8)


# -----------------------------------------------------------------------------
# bench.py --gpu: what it needs, and what it writes


def test_gpu_check_without_gpu_says_so(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for argv in (["--gpu", "--out_dir", str(tmp_path)], ["--gpu", "true", "--out", str(tmp_path)]):  # the old spelling
        p = subprocess.run([sys.executable, "bench.py", *argv], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode != 0
        assert "no CUDA GPU" in p.stderr and "Traceback" not in p.stderr
        assert not any(tmp_path.iterdir())


def test_gpu_check_needs_only_what_the_gpu_machine_has(tmp_path):
    # the lent GPU machine has torch, triton, pytest and transformers (so numpy and safetensors),
    # not tiktoken or sentencepiece: the check, and the test files it runs, must import without them
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("tiktoken", "sentencepiece"):  # found first on PYTHONPATH, and failing to import
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    code = ("import sys; sys.path.insert(0, 'tests'); import conftest, bench, train, sample, convert, eval; "
            "import test_kernels, test_model, test_convert\n"
            "try:\n    import tiktoken\nexcept ImportError:\n    print('blocked')")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "blocked" in p.stdout, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "bench.py", "--gpu", "--out_dir", str(tmp_path / "out")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "no CUDA GPU" in p.stderr and "Traceback" not in p.stderr


def test_gpu_check_writes_each_section_as_it_comes(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import bench

    seen = []

    def section(result):
        def run(args):
            seen.append(json.loads((tmp_path / "gpu_check.json").read_text()) if seen else None)
            if isinstance(result, Exception):
                raise result
            return result
        return run
    monkeypatch.setitem(bench.SECTIONS, "kernels", section({"swiglu": 1.0}))
    monkeypatch.setitem(bench.SECTIONS, "train", section(RuntimeError("kernel did not compile")))
    monkeypatch.setitem(bench.SECTIONS, "decode", section({"dense": 2.0}))
    results = bench.gpu_check(SimpleNamespace(out_dir=str(tmp_path)), tests=False)
    assert results["train"] == {"error": "RuntimeError: kernel did not compile"}  # reported; the next one ran
    assert results["decode"] == {"dense": 2.0}
    assert seen[2]["train"]["error"] and "decode" not in seen[2]  # on disk before the next section began
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == results
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json"]  # no temporary file left
