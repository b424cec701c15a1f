"""The paths a GPU takes (grouped GEMMs, FlexAttention, compiled blocks and decode, fused LoRA),
run on the CPU and held equal to the plain twins they replace."""

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


def test_grouped_path_is_chosen_only_where_it_is_fast():
    y, down = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(2, 8, 16, dtype=torch.bfloat16)
    assert not moe.grouped_mm_usable(y, down)  # a CPU tensor: the sorted path runs


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
    from moe import PESCConfig

    torch.manual_seed(0)
    pesc = PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0, lora_rank=4, lora_dropout=0.0)
    net = Transformer(ModelConfig.from_preset("tiny", n_layers=3, moe=pesc))
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
# bench.py --gpu: the parts a CPU can run, and the message without a GPU


# The CPU stands in for the GPU here; its bf16 matmuls (oneDNN) may need ATen's AVX-512 kernels,
# so under ATEN_CPU_CAPABILITY=default or on a CPU without AVX-512 the bf16 logits part either
# works (some oneDNN builds manage without) or reports exactly that error; the other parts run.
CPU_BF16 = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def assert_logits_part(r):
    if CPU_BF16 or "error" not in r:
        assert "error" not in r and r["ok"], r.get("traceback")
    else:
        assert "avx512" in r["error"], r


def test_gpu_check_parts_run_on_cpu(tmp_path):
    import json

    import bench

    results = bench.gpu_check(str(tmp_path), device="cpu", shape="tiny", layers=2, seq_len=32)
    for name, r in results["parts"].items():
        if name != "logits_bf16_vs_fp32_cpu":
            assert "error" not in r, (name, r.get("traceback"))
    parts = results["parts"]
    assert_logits_part(parts["logits_bf16_vs_fp32_cpu"])
    for name in ("train_lora_eager", "train_pesc_compiled", "train_pesc_triton", "decode_compiled"):
        assert parts[name]["tokens_per_s"] > 0
    assert parts["decode_eager"]["share_of_bound"] > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"].keys() == parts.keys()
    assert "| train_pesc_eager |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_part_failure_is_reported(tmp_path, monkeypatch):
    import bench

    def broken(*args):
        raise RuntimeError("kernel did not compile")
    monkeypatch.setattr(bench, "check_bandwidth", broken)
    monkeypatch.setattr(bench, "check_train", broken)
    monkeypatch.setattr(bench, "check_decode", broken)
    results = bench.gpu_check(str(tmp_path), device="cpu", shape="tiny", layers=2, seq_len=32)
    assert results["parts"]["bandwidth"]["error"] == "RuntimeError: kernel did not compile"
    assert_logits_part(results["parts"]["logits_bf16_vs_fp32_cpu"])  # the rest still ran


def test_gpu_check_without_gpu_says_so(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "bench.py", "--gpu", "--out", str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
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
            "import test_kernels, test_model\n"
            "try:\n    import tiktoken\nexcept ImportError:\n    print('blocked')")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "blocked" in p.stdout, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "bench.py", "--gpu", "--out", str(tmp_path / "out")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "no CUDA GPU" in p.stderr and "Traceback" not in p.stderr


def fake_parts(monkeypatch, seconds=0.0):
    """Replace the measuring parts of bench.gpu_check by ones that sleep `seconds` and return
    made-up numbers: what is tested then is the scheduling around them."""
    import time

    import bench

    def part(result):
        def run(*args):
            time.sleep(seconds)
            return dict(result)
        return run
    monkeypatch.setattr(bench, "check_logits", part({"ok": True}))
    monkeypatch.setattr(bench, "check_bandwidth", part({"GB_per_s": 1.0}))
    monkeypatch.setattr(bench, "check_train", part({"tokens_per_s": 1, "step_ms": 1.0}))
    monkeypatch.setattr(bench, "check_decode", part({"tokens_per_s": 1.0}))
    return bench


def test_gpu_check_budget_skips_the_parts_that_do_not_fit(tmp_path, monkeypatch):
    import json

    bench = fake_parts(monkeypatch, seconds=0.3)
    monkeypatch.setattr(bench, "GPU_PART_LIMITS_S", {name: 1.0 for name in bench.GPU_PART_LIMITS_S})
    # 1.2 s: the CPU's instant "tests", then parts of 0.3 s while a quarter of a limit is left
    results = bench.gpu_check(str(tmp_path), device="cpu", shape="tiny", layers=2, seq_len=32, budget_s=1.2)
    parts = results["parts"]
    assert list(parts) == list(bench.GPU_PART_LIMITS_S)  # every part is reported, in order
    ran = [name for name, r in parts.items() if "skipped" not in r or r["skipped"] == "CPU"]
    assert ran[:2] == ["tests", "logits_bf16_vs_fp32_cpu"] and 2 <= len(ran) <= 4, ran
    skipped = [name for name in parts if name not in ran]
    assert skipped == list(parts)[len(ran):]  # once the budget is spent, nothing after runs
    assert all(parts[name]["skipped"].startswith("time budget: ") for name in skipped)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["finished"] and on_disk["parts"] == parts
    assert on_disk["goals"]["decode_share_of_bound"]["status"] == "unmeasured"
    assert "| decode_compiled | skipped time budget: " in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_part_past_its_limit_is_stopped_and_the_next_runs(tmp_path, monkeypatch):
    import signal
    import time

    bench = fake_parts(monkeypatch)

    def hangs(device):
        time.sleep(30)

    def hangs_in_a_library(*args):  # Dynamo wraps what its backend raises; still a timeout
        try:
            time.sleep(30)
        except TimeoutError as e:
            raise RuntimeError("backend compiler failed") from e
    monkeypatch.setattr(bench, "check_logits", hangs)
    monkeypatch.setattr(bench, "check_bandwidth", hangs_in_a_library)
    monkeypatch.setitem(bench.GPU_PART_LIMITS_S, "logits_bf16_vs_fp32_cpu", 0.3)
    monkeypatch.setitem(bench.GPU_PART_LIMITS_S, "bandwidth", 0.3)
    outer = []  # an outer timer (pytest-timeout's, say) keeps running
    old_handler = signal.signal(signal.SIGALRM, lambda *a: outer.append(1))
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        t0 = time.perf_counter()
        parts = bench.gpu_check(str(tmp_path), device="cpu", shape="tiny", layers=2, seq_len=32)["parts"]
        assert time.perf_counter() - t0 < 10
        assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] < 60
        assert signal.getsignal(signal.SIGALRM) is not old_handler and not outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
    assert parts["logits_bf16_vs_fp32_cpu"]["error"].startswith("timeout: stopped after its 0.3 s limit (TimeoutError")
    assert parts["logits_bf16_vs_fp32_cpu"]["seconds"] < 5
    assert parts["bandwidth"]["error"].startswith("timeout: ")
    assert "backend compiler failed" in parts["bandwidth"]["error"]
    assert parts["train_pesc_eager"] == {"tokens_per_s": 1, "step_ms": 1.0, "seconds": 0.0}  # the next part ran
    assert parts["decode_compiled"]["tokens_per_s"] == 1.0


def test_gpu_check_killed_midway_leaves_the_finished_parts(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import os, signal, bench\n"
            f"bench.check_logits = lambda device: {{'ok': True}}\n"
            f"bench.check_train = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"bench.gpu_check({str(tmp_path)!r}, device='cpu', shape='tiny', layers=2, seq_len=32)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results["parts"]) == ["tests", "logits_bf16_vs_fp32_cpu"]
    assert results["parts"]["logits_bf16_vs_fp32_cpu"]["ok"] is True
    assert results["running"] == "train_pesc_eager" and not results["finished"]
    assert "not finished: running train_pesc_eager at " in (tmp_path / "gpu_check.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.md"]  # no temp file left


def train_part(step_ms, mfu=None):
    return {"step_ms": step_ms, **({} if mfu is None else {"mfu": mfu})}


def goal_parts(pesc=None, lora=None, decode=None, tests=None):
    """Synthetic gpu_check parts: pesc and lora map a mode to (step_ms, mfu) or to a part dict
    (a failure, a skip); decode maps eager/compiled to a share of the bound or a part dict."""
    parts = {"tests": tests or {"skipped": "CPU"}}
    for kind, modes in (("pesc", pesc or {}), ("lora", lora or {})):
        for mode, r in modes.items():
            parts[f"train_{kind}_{mode}"] = r if isinstance(r, dict) else train_part(*r)
    for mode, r in (decode or {}).items():
        parts[f"decode_{mode}"] = r if isinstance(r, dict) else {"tokens_per_s": 10.0, "share_of_bound": r}
    return parts


FAILED = {"error": "RuntimeError: kernel did not compile"}
SKIPPED = {"skipped": "time budget: 3 s of 450 s left"}


@pytest.mark.parametrize("mfu,status", [
    ({"eager": 0.3, "triton": 0.45, "compiled": FAILED}, "met"),  # one mode reaches it: the best does
    ({"eager": 0.3, "triton": 0.35, "compiled": 0.38}, "not met"),
    ({"eager": 0.3, "triton": 0.35, "compiled": SKIPPED}, "unmeasured"),  # the missing one might reach it
    ({"eager": None, "triton": None, "compiled": None}, "unmeasured"),  # a CPU: step times, no MFU
    ({}, "unmeasured"),
])
def test_gpu_goals_pesc_mfu(mfu, status):
    import bench

    pesc = {m: v if isinstance(v, dict) else (100.0, v) for m, v in mfu.items()}
    assert bench.gpu_goals(goal_parts(pesc=pesc))["pesc_mfu"]["status"] == status


@pytest.mark.parametrize("pesc,lora,status", [
    ({"eager": 300.0, "triton": 110.0, "compiled": 120.0}, {"eager": 100.0, "triton": 100.0, "compiled": 120.0}, "met"),
    ({"eager": 110.0, "triton": 120.0, "compiled": 130.0}, {"eager": 90.0, "triton": 120.0, "compiled": 130.0},
     "not met"),
    # judged in PESC's fastest mode (triton), not in the one that looks best (eager)
    ({"eager": 300.0, "triton": 120.0, "compiled": 130.0}, {"eager": 300.0, "triton": 100.0, "compiled": 130.0},
     "not met"),
    ({"eager": 300.0, "triton": 110.0, "compiled": 120.0}, {"eager": 100.0, "triton": FAILED, "compiled": 120.0},
     "unmeasured"),
    ({"eager": 300.0, "triton": 110.0, "compiled": SKIPPED}, {"eager": 300.0, "triton": 100.0, "compiled": SKIPPED},
     "unmeasured"),  # the skipped mode might have been PESC's fastest
])
def test_gpu_goals_pesc_vs_lora_step(pesc, lora, status):
    import bench

    def parts(modes):
        return {m: v if isinstance(v, dict) else (v,) for m, v in modes.items()}
    goal = bench.gpu_goals(goal_parts(pesc=parts(pesc), lora=parts(lora)))["pesc_vs_lora_step"]
    assert goal["status"] == status, goal


@pytest.mark.parametrize("decode,status", [
    ({"eager": 0.2, "compiled": 0.7}, "met"),
    ({"eager": 0.2, "compiled": 0.59}, "not met"),
    ({"eager": 0.2, "compiled": FAILED}, "unmeasured"),
    ({"eager": 0.2, "compiled": {"tokens_per_s": 50.0}}, "unmeasured"),  # no bandwidth, so no bound
])
def test_gpu_goals_decode(decode, status):
    import bench

    assert bench.gpu_goals(goal_parts(decode=decode))["decode_share_of_bound"]["status"] == status


@pytest.mark.parametrize("tests,status", [
    ({"passed": True, "summary": "120 passed"}, "met"),
    ({"passed": False, "summary": "1 failed, 40 passed"}, "not met"),
    ({"error": "pytest ran past 175 s"}, "unmeasured"),
    (SKIPPED, "unmeasured"),
])
def test_gpu_goals_tests(tests, status):
    import bench

    assert bench.gpu_goals(goal_parts(tests=tests))["tests"]["status"] == status


def test_gpu_check_logits_part_converts_and_would_see_a_bad_conversion(monkeypatch):
    import bench
    import convert

    try:
        r = bench.check_logits("cpu")
    except RuntimeError as e:  # gpu_check reports this; nothing more to check on such a CPU
        assert_logits_part({"error": f"RuntimeError: {e}"})
        return
    assert_logits_part(r)
    assert r["layout"] == "camelidae" and r["config_round_trip"] and r["weights_exact"]
    assert r["adapter_effect"] > r["bound"]  # the adapters show in the logits beyond the bound

    hf_tensors = convert.hf_tensors

    def swapped_experts(model, dtype, *naming):  # a converter bug: experts 0 and 1 of layer 1 trade places
        for key, t in hf_tensors(model, dtype, *naming):
            if ".layers.1." in key and ".expert_0." in key:
                key = key.replace(".expert_0.", ".expert_1.")
            elif ".layers.1." in key and ".expert_1." in key:
                key = key.replace(".expert_1.", ".expert_0.")
            yield key, t
    monkeypatch.setattr(convert, "hf_tensors", swapped_experts)
    bad = bench.check_logits("cpu")
    assert not bad["weights_exact"] and not bad["ok"]
    assert bad["max_abs_err"] > 2 * r["max_abs_err"]
