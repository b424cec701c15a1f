"""
Benchmarks. Each section warms up, then times; numbers go to BENCHMARKS.md by hand, with the
machine, the date and the command.

    python bench.py                      # every section that fits the device
    python bench.py --only moe           # one PESC layer vs the dense FFN (CPU, dim 1024, 4096 tokens)
    python bench.py --only decode,train  # generation and training throughput
    python bench.py --only model --device cuda     # a Llama-2-7B-shaped PESC model training (GPU)
    python bench.py --only kernels --device cuda   # Triton kernels vs their twins (GPU)
    python bench.py --only lora          # fused LoRA vs its twin vs transformers + PEFT (CPU)
    python bench.py --gpu --out DIR      # the prepared check for a 1-GPU machine (JSON + table)
    python bench.py --only quant         # NF4: bytes/param, dequantize throughput, QLoRA step
    python bench.py --only quant7b       # NF4: resident memory of a Llama-2-7B-shaped quantized base
    python bench.py --only eval          # eval.py's scoring vs the bare forward passes it needs
    OMP_NUM_THREADS=1 python bench.py --only compare   # dense LoRA vs full vs PESC, tuned and scored
    python bench.py --only data          # tokenizing 200K ShareGPT conversations into the token cache
    python bench.py --only fsdp_load     # peak memory per rank loading a 1B base for --fsdp (CPU, 2 ranks)
    .venv-serve/bin/python bench.py --only serve   # vLLM serving PESC vs dense (needs the serve venv)
"""

import argparse
import importlib
import math
import multiprocessing
import os
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F

import kernels
import model
import moe
import quant
from data import attention_inputs
from model import FeedForward, ModelConfig, Transformer, peak_flops
from moe import LORA_TARGETS, PESCConfig, PESCFeedForward, add_lora, pesc_layers, set_trainable, upcycle
from sample import DTYPES, generate


def timeit(fn, warmup=2, iters=7, device="cpu"):
    """Fastest of `iters` timed calls of fn(), in seconds, after `warmup` calls. The minimum, not
    the mean: on a shared machine noise only ever adds time."""
    return race([fn], warmup, iters, device)[0]


def race(fns, warmup=2, iters=7, device="cpu"):
    """timeit for several functions whose times are compared: the calls take turns (round robin),
    so a slow spell of the machine falls on all of them rather than on whichever ran then."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@contextmanager
def kernel_mode(mode, loop=False):
    """Run the block with PESC_KERNELS=mode (and, with loop=True, the loop-over-experts dispatch
    in place of moe.adapter_experts); restore both afterwards."""
    saved_env, saved_fn = os.environ.get("PESC_KERNELS"), moe.adapter_experts
    os.environ["PESC_KERNELS"] = mode
    if loop:
        moe.adapter_experts = moe.adapter_experts_loop  # the same signature
    try:
        yield
    finally:
        moe.adapter_experts = saved_fn
        if saved_env is None:
            os.environ.pop("PESC_KERNELS", None)
        else:
            os.environ["PESC_KERNELS"] = saved_env


# -----------------------------------------------------------------------------
# One PESC layer vs the dense FFN, on the CPU


def adapter_experts_dense(y, weights, experts, down, up, scaling):
    """The dense alternative: every expert on every token, then mask to the chosen k.

    Worth it only when E * r is small next to the FFN (it costs E/k times the sorted path's FLOPs)."""
    N, D = y.shape
    E, r, _ = down.shape
    gate = torch.zeros(N, E, dtype=y.dtype, device=y.device).scatter(1, experts, weights.to(y.dtype))
    h = F.gelu(y @ down.reshape(E * r, D).T).view(N, E, r) * (scaling * gate)[..., None]
    return y + h.view(N, E * r) @ up.permute(1, 0, 2).reshape(D, E * r).T


def bench_moe(args):
    """Forward + backward of one layer: dense frozen FFN vs PESC (frozen FFN + router + adapters)."""
    dev, dt = args.device, torch.float32
    D, F_, E, k, r, N = 1024, 2816, 8, 2, 64, 4096
    torch.manual_seed(0)
    ffn = FeedForward(D, F_).to(dev, dt).requires_grad_(False)
    cfg = PESCConfig(num_experts=E, top_k=k, adapter_dim=r, adapter_dropout=0.0)
    layer = PESCFeedForward(ffn, cfg).to(dev)
    with torch.no_grad():
        layer.adapter_up.normal_(0, 0.02)
    x = torch.randn(1, N, D, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(1, N, D, device=dev, dtype=dt)

    def dense_step():
        ffn(x).backward(g)

    def pesc_step():
        layer(x, cfg)[0].backward(g)

    # the MoE part alone: router, dispatch, adapters, combine, on a fixed FFN output
    y = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
    xf = x.detach().view(N, D)

    def moe_part(fn):
        def step():
            w, e = moe.route(layer.router(xf), k)
            fn(y, w, e, layer.adapter_down, layer.adapter_up, 0.25).backward(g.view(N, D))
        return step

    t_dense, t_pesc = race([dense_step, pesc_step], device=dev)
    parts = [moe.adapter_experts_sorted, moe.adapter_experts_loop, adapter_experts_dense]
    t_fast, t_loop, t_mask = race([moe_part(fn) for fn in parts], device=dev)
    flop_ratio = (3 * F_ + (k * 2 * r + E) * 1.5) / (3 * F_)  # adapters/router also get weight grads
    res = dict(dense_ms=1e3 * t_dense, pesc_ms=1e3 * t_pesc, ratio=t_pesc / t_dense, flop_ratio=flop_ratio,
               moe_sorted_ms=1e3 * t_fast, moe_loop_ms=1e3 * t_loop, moe_dense_masked_ms=1e3 * t_mask,
               speedup_vs_loop=t_loop / t_fast)
    print(f"[moe] N={N} dim={D} ffn={F_} E={E} k={k} r={r} fp32 {dev}, forward+backward (FFN frozen):")
    print(f"  dense FFN        {res['dense_ms']:8.1f} ms")
    print(f"  PESC layer       {res['pesc_ms']:8.1f} ms   ratio {res['ratio']:.3f} (FLOP ratio {flop_ratio:.3f})")
    print(f"  MoE part: sorted {t_fast * 1e3:8.1f} ms | loop {t_loop * 1e3:8.1f} ms | dense-masked "
          f"{t_mask * 1e3:8.1f} ms | sorted is {res['speedup_vs_loop']:.1f}x faster than the loop")
    return res


# -----------------------------------------------------------------------------
# Decoding: the KV cache vs recomputing the sequence


def bench_decode(args):
    """Greedy decode tokens/s of a small model (dim 512, 8 layers, vocab 32000), batch 1.

    "kv_cache": sample.generate, one token per step through the cache; the prefill is left out
    (timed from the first new token to the last). "recompute": the whole sequence through the
    model again for every new token, as without a cache. Dense, then PESC (8 experts top-2,
    adapter_dim 64). args needs .device; optional .dtype (fp32|bf16|fp16; default fp32 on CPU,
    bf16 on CUDA), .prompt_len (16), .new_tokens (48). Returns {kind: {"kv_cache", "recompute"}}."""
    device = torch.device(args.device)
    dtype = DTYPES.get(getattr(args, "dtype", None) or "", torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompt_len, new_tokens = getattr(args, "prompt_len", 16), getattr(args, "new_tokens", 48)
    config = ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408,
                         max_seq_len=prompt_len + new_tokens)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def cached(model, prompt, n):
        stamps = []

        def on_token(ids):
            sync()
            stamps.append(time.perf_counter())

        generate(model, prompt, n, temperature=0, on_token=on_token)
        return (n - 1) / (stamps[-1] - stamps[0])  # tokens after the first, over their time

    @torch.no_grad()
    def recompute(model, prompt, n):
        seq = prompt
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        sync()
        return n / (time.perf_counter() - t0)

    print(f"decode: dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}, batch 1, "
          f"prompt {prompt_len} + {new_tokens} new tokens, greedy, {device} {str(dtype)[6:]}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    for kind in ("dense", "pesc"):
        torch.manual_seed(0)
        model = Transformer(config)
        if kind == "pesc":
            upcycle(model, PESCConfig(num_experts=8, top_k=2, adapter_dim=64, adapter_dropout=0.0))
            with torch.no_grad():
                for ff in pesc_layers(model):
                    ff.adapter_up.normal_(0, 0.02)  # non-zero experts, as after training
        model = model.to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
        cached(model, prompt, 4), recompute(model, prompt, 4)  # warm-up: allocator, kernels, caches
        r = {"kv_cache": cached(model, prompt, new_tokens), "recompute": recompute(model, prompt, new_tokens)}
        results[kind] = r
        print(f"  {kind:<6} KV cache {r['kv_cache']:8.1f} tokens/s   recompute {r['recompute']:8.1f} tokens/s   "
              f"cache speed-up {r['kv_cache'] / r['recompute']:.1f}x")
    print(f"  PESC / dense with the KV cache: {results['pesc']['kv_cache'] / results['dense']['kv_cache']:.2f}")
    return results


# -----------------------------------------------------------------------------
# Triton kernels vs their PyTorch twins (GPU)


def bench_kernels(args):
    """Each Triton kernel vs its twin (forward + backward, ms and peak memory), then one PESC FFN
    layer at Camelidae-8x7B sizes vs the dense frozen FFN, with the kernels on and off.

    Both sides run the model's own code (model.py, moe.py); PESC_KERNELS picks the path."""
    if args.device != "cuda":
        print("[kernels] skipped: the Triton kernels are timed on a GPU (--device cuda)")
        return {}
    if kernels.triton is None:
        print("[kernels] skipped: Triton is not installed")
        return {}
    dev, dt = "cuda", torch.bfloat16
    D, F_, E, k, r, N = 4096, 11008, 8, 2, 512, 8192  # Camelidae-8x7B (Llama-2-7B base), 8192 tokens
    B, T, H, hd, V = 16, 512, 32, 128, 32000  # the same tokens as 16 sequences of 512
    torch.manual_seed(0)

    def randn(*shape, grad=False, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_(grad)

    def fwd_bwd(fn, inputs, params=()):
        """A step: fn(*inputs), then backward into the inputs (and params) that need a gradient."""
        wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + list(params)
        with torch.no_grad():  # fixed random output gradients of the right shapes
            out = fn(*inputs)
        grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

        def step():
            out = fn(*inputs)
            torch.autograd.grad(out if isinstance(out, tuple) else (out,), wrt, grads)
        return step

    def measure(step):
        """(median ms, peak MiB above what the inputs already hold); the first call compiles."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return 1e3 * timeit(step, device="cuda"), peak

    # the kernels' inputs, as the model produces them
    norm = model.RMSNorm(D, 1e-5).to(dev, dt).requires_grad_(False)  # a frozen base norm
    x, resid = randn(N, D, grad=True), randn(N, D, grad=True)
    a, b = randn(N, F_, grad=True), randn(N, F_, grad=True)
    qkv = randn(B, T, 3 * H * hd, grad=True)
    angles = torch.arange(T, device=dev).float()[:, None] * 10000.0 ** (-torch.arange(0, hd, 2, device=dev) / hd)
    cos, sin = angles.cos()[None], angles.sin()[None]  # (1, T, hd/2)
    h, lm_head = randn(N, D, grad=True), randn(V, D, scale=0.02)  # the LM head is frozen in PESC
    targets = torch.randint(0, V, (N,), device=dev)
    y = randn(N, D, grad=True)
    weights, experts = moe.route(torch.randn(N, E, device=dev), k)
    weights.requires_grad_()
    down, up = randn(E, r, D, grad=True, scale=D ** -0.5), randn(E, D, r, grad=True, scale=0.02)

    def rope(qkv):  # q: a strided view of the fused projection
        return model.apply_rope(qkv.view(B, T, 3 * H, hd)[:, :, :H], cos, sin)

    def lm_loss(h):  # as Transformer.forward computes the loss
        if kernels.use_triton(h):
            return kernels.linear_cross_entropy(h, lm_head, targets)
        return model.cross_entropy(F.linear(h, lm_head), targets)

    def adapters(y, weights, down, up):  # Camelidae: s = 0.25, dropout 0.1, training
        return moe.adapter_experts(y, weights, experts, down, up, 0.25, 0.1, True)

    cases = [
        ("rms_norm + residual", norm, (x, resid)),
        ("swiglu", model.swiglu, (a, b)),
        ("apply_rope (q of qkv)", rope, (qkv,)),
        (f"linear_cross_entropy V={V}", lm_loss, (h,)),
        (f"adapter_experts E={E} k={k} r={r}", adapters, (y, weights, down, up)),
    ]
    # the twin of adapter_experts is moe's sorted PyTorch path; the per-expert loop is the reference
    loop = ("  adapter loop (reference)", lambda y, w, d, u: moe.adapter_experts_loop(y, w, experts, d, u, 0.25, 0.1, True),
            (y, weights, down, up))

    results = {}
    print(f"[kernels] {torch.cuda.get_device_name()}, bf16, N={N} tokens, dim={D}, ffn={F_}; "
          f"forward+backward, fastest of 7; MiB = peak above the inputs")
    print(f"  {'':32s} {'triton ms':>10s} {'twin ms':>9s} {'speedup':>8s} {'triton MiB':>11s} {'twin MiB':>9s}")
    for name, fn, inputs in cases:
        row = {}
        for mode in ("triton", "torch"):
            with kernel_mode(mode):
                row[mode] = measure(fwd_bwd(fn, inputs))
        (t_ms, t_mib), (p_ms, p_mib) = row["triton"], row["torch"]
        results[name] = dict(triton_ms=t_ms, twin_ms=p_ms, triton_mib=t_mib, twin_mib=p_mib)
        print(f"  {name:32s} {t_ms:10.2f} {p_ms:9.2f} {p_ms / t_ms:7.2f}x {t_mib:11.0f} {p_mib:9.0f}")
    l_ms, l_mib = measure(fwd_bwd(*loop[1:]))
    results["adapter_loop"] = dict(ms=l_ms, mib=l_mib)
    print(f"  {loop[0]:32s} {'':10s} {l_ms:9.2f} {'':8s} {'':11s} {l_mib:9.0f}")

    # One PESC FFN layer vs the dense frozen FFN: backward to the input and to the router
    # and adapters only (the FFN is frozen), training mode (adapter dropout on).
    ffn = FeedForward(D, F_).to(dev, dt).requires_grad_(False)
    cfg = PESCConfig(num_experts=E, top_k=k, adapter_dim=r)
    layer = PESCFeedForward(ffn, cfg).train()
    with torch.no_grad():
        layer.adapter_up.normal_(0, 0.02)  # zero at upcycling; trained adapters are not
    trainable = [p for p in layer.parameters() if p.requires_grad]  # router + adapters
    xl = randn(B, T, D, grad=True)
    print(f"  PESC layer (E={E}, k={k}, r={r}, s=0.25, dropout 0.1) vs dense frozen FFN, {B}x{T} tokens:")
    for mode in ("triton", "torch"):
        with kernel_mode(mode):
            d_ms, d_mib = measure(fwd_bwd(ffn, (xl,)))
            p_ms, p_mib = measure(fwd_bwd(lambda x: layer(x, cfg)[0], (xl,), trainable))
        results[f"layer_{mode}"] = dict(dense_ms=d_ms, pesc_ms=p_ms, ratio=p_ms / d_ms, dense_mib=d_mib, pesc_mib=p_mib)
        label = "kernels" if mode == "triton" else "twins  "
        print(f"    {label}: dense {d_ms:7.2f} ms {d_mib:6.0f} MiB | PESC {p_ms:7.2f} ms {p_mib:6.0f} MiB"
              f" | PESC / dense = {p_ms / d_ms:.3f}")
    return results


def bench_model(args):
    """Training step tokens/s and MFU of a Llama-2-7B-shaped PESC model (Camelidae-8x7B settings,
    first `--layers` layers, bf16): Triton kernels, their PyTorch twins, and the twins with the
    official loop-over-experts dispatch as the baseline. GPU only."""
    if args.device != "cuda":
        print("[model] skipped: full-model training throughput is measured on a GPU (--device cuda)")
        return {}
    B, T = 8, 512
    cfg = ModelConfig.from_preset("llama2-7b", n_layers=args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = upcycle(Transformer(cfg).to(torch.bfloat16), PESCConfig.from_preset("camelidae-8x7b"))
    with torch.no_grad():
        for ff in pesc_layers(net):
            ff.adapter_up.normal_(0, 0.02)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    peak = peak_flops("cuda") or model.PEAK_FLOPS["H100"]["bf16"]

    def step():
        _, loss = net(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    for name, mode, loop in (("kernels", "triton", False), ("twins", "torch", False), ("loop", "torch", True)):
        with kernel_mode(mode, loop):
            torch.cuda.reset_peak_memory_stats()
            dt = timeit(step, warmup=2, iters=5, device="cuda")
        tps = B * T / dt
        r = results[name] = dict(tokens_per_s=tps, mfu=net.estimate_mfu(tps, T, peak),
                                 peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        print(f"[model] llama2-7b x {cfg.n_layers} layers PESC 8x top-2 r=512 bf16 B={B} T={T} {name:8s}: "
              f"{tps:9.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gib']:.1f} GiB")
    return results


# -----------------------------------------------------------------------------
# Training throughput per train.py --mode


def bench_train(args):
    """Training step throughput and peak memory per train.py --mode: pesc (routers + adapters),
    pesc+lora (the official recipe's trainable parts), lora and full (the dense baselines).

    Stepped as train.py steps: AdamW over the trainable tensors only (fp32 master copies, frozen
    weights in the compute dtype), bf16 autocast on GPU, dropout as in the official recipe, rows
    packed with 4 examples each (block-diagonal mask, train.py's default). CPU: the 'small'
    preset (3.2M parameters). GPU: Llama-2-7B's first --layers layers, with Camelidae-8x7B's
    PESC settings and LoRA r=64, plus MFU. Each mode runs in a fresh process, so that its peak
    memory is its own: the CUDA allocator's peak on GPU; on CPU the peak resident memory, and
    how much of it came on top of the idle process (torch itself holds a few hundred MiB)."""
    ctx = multiprocessing.get_context("spawn")  # a clean process: no memory kept from a previous mode
    results = {}
    for mode in ("pesc", "pesc+lora", "lora", "full"):
        with ctx.Pool(1) as pool:
            r = results[mode] = pool.apply(train_step_bench, (mode, args.device, args.layers))
        mem = f"peak {r['peak_mib'] / 1024:.1f} GiB" if "cuda" in args.device else \
            f"peak RSS {r['peak_mib']:.0f} MiB (+{r['peak_above_idle_mib']:.0f} over the idle process)"
        mfu = f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""
        print(f"[train] {r['model']} B={r['B']} T={r['T']} packed {mode:9s}: {r['tokens_per_s']:9.0f} tokens/s{mfu}  "
              f"{mem}  trainable {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.1f}M")
    return results


# -----------------------------------------------------------------------------
# NF4 / QLoRA


def quantize_base(net):
    """Swap the seven base linears of every layer for NF4 ones, in place (the in-memory twin of
    Transformer.from_pretrained(quantize="nf4"))."""
    for layer in net.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name in LORA_TARGETS.values():
                if isinstance(getattr(parent, name, None), torch.nn.Linear):
                    setattr(parent, name, quant.NF4Linear.from_linear(getattr(parent, name)))


def bench_quant(args):
    """Bytes per base parameter, the twin's (or on CUDA the kernel's) dequantize throughput on a
    Llama-2-7B FFN weight, and a QLoRA PESC training step against the same step unquantized."""
    dev = args.device
    w = torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16) * 0.02
    packed = quant.quantize_nf4(w)
    print(f"[quant] 11008x4096 weight: {packed.nbytes() / packed.numel():.4f} bytes/param in NF4 "
          f"(double-quantized absmax), {w.element_size()} in bf16; {8 * packed.nbytes() / packed.numel():.3f} bits")
    for dtype in (torch.bfloat16, torch.float32):
        fns = [lambda: quant.dequantize_torch(packed, dtype)]
        names = ["twin"]
        if dev.startswith("cuda"):
            fns.append(lambda: quant.dequantize_nf4(packed, dtype))
            names.append("kernel")
        for name, t in zip(names, race(fns, warmup=1, iters=5, device="cuda" if dev.startswith("cuda") else "cpu")):
            moved = packed.nbytes() + packed.numel() * dtype.itemsize  # read the packed form, write the weight
            print(f"[quant] dequantize ({name}) -> {str(dtype)[6:]}: {t * 1e3:.1f} ms, "
                  f"{packed.numel() / t / 1e6:,.0f} Mparam/s, {moved / t / 1e9:.2f} GB/s moved")
    del w, packed
    # the two steps take turns (race), so the machine's noise falls on both alike
    steps = [train_step(mode, dev, args.layers) for mode in ("pesc+lora", "qlora")]
    times = race([step for step, _, _ in steps], warmup=2, iters=5, device="cuda" if dev.startswith("cuda") else "cpu")
    for mode, (_, r, _), t in zip(("pesc+lora", "qlora"), steps, times):
        print(f"[quant] {r['model']} B={r['B']} T={r['T']} {mode:9s}: {t * 1e3:8.1f} ms/step, "
              f"{r['B'] * r['T'] / t:8.0f} tokens/s")
    print(f"[quant] NF4 QLoRA step / unquantized step: {times[1] / times[0]:.2f}")


def bench_quant7b(args):
    """Resident memory of a Llama-2-7B-shaped model whose base linears are NF4, built on the CPU
    from random bf16 weights one tensor at a time (as from_pretrained(quantize="nf4") loads)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        r = pool.apply(quant7b_build)
    print(f"[quant7b] llama2-7b, base linears in NF4, the rest bf16: {r['params'] / 1e9:.3f}B parameters, "
          f"built in {r['seconds']:.0f} s")
    print(f"[quant7b] tensors {r['tensor_gib']:.2f} GiB (NF4 linears {r['nf4_gib']:.2f} GiB for "
          f"{r['nf4_params'] / 1e9:.3f}B params = {r['nf4_bytes_per_param']:.4f} B/param; bf16 would be "
          f"{2 * r['params'] / 2**30:.2f} GiB); resident {r['rss_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, "
          f"idle process {r['idle_gib']:.2f} GiB")


def quant7b_build():
    import resource

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    idle = rss()
    t0 = time.perf_counter()
    cfg = ModelConfig.from_preset("llama2-7b")
    with torch.device("meta"):
        net = Transformer(cfg)
    nf4_bytes = nf4_params = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name in LORA_TARGETS.values():
                w = torch.empty(child.weight.shape, dtype=torch.bfloat16).normal_(0, 0.02)
                nf4 = quant.NF4Linear(quant.quantize_nf4(w))
                del w
                setattr(module, name, nf4)
                nf4_bytes += nf4.packed.nbytes()
                nf4_params += nf4.in_features * nf4.out_features
    for module in net.modules():  # embeddings, norms, LM head: bf16
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02),
                                                     requires_grad=False))
    other = sum(p.numel() * p.element_size() for p in net.parameters())
    return dict(params=net.num_params(), seconds=time.perf_counter() - t0, nf4_params=nf4_params,
                nf4_gib=nf4_bytes / 2**30, nf4_bytes_per_param=nf4_bytes / nf4_params,
                tensor_gib=(nf4_bytes + other) / 2**30, rss_gib=rss(), idle_gib=idle,
                peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def train_step_bench(mode, device, layers):
    """One mode of bench_train, in its own process."""
    import resource

    cuda = device.startswith("cuda")
    idle_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process before the model (KiB on Linux)
    step, r, net = train_step(mode, device, layers)
    dt = timeit(step, warmup=2, iters=5, device="cuda" if cuda else "cpu")
    tps = r["B"] * r["T"] / dt
    r["tokens_per_s"] = tps
    if cuda:
        r["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if r["peak"] is not None:
            r["mfu"] = net.estimate_mfu(tps, r["T"], r["peak"])
    else:
        r["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r["peak_above_idle_mib"] = r["peak_mib"] - idle_kib / 1024
    return r


def train_step(mode, device, layers):
    """(one training step of `mode` as a function, its sizes, the model). mode: pesc, pesc+lora,
    lora, full, or qlora (pesc+lora on an NF4 base)."""
    cuda = device.startswith("cuda")
    if cuda:
        cfg = ModelConfig.from_preset("llama2-7b", n_layers=layers)
        pesc, lora_rank, B, T, dtype = PESCConfig.from_preset("camelidae-8x7b"), 64, 4, 1024, torch.bfloat16
        peak = peak_flops("cuda", dtype)
        name = f"llama2-7b x {layers} layers"
    else:
        cfg = ModelConfig.from_preset("small")
        pesc, lora_rank, B, T, dtype = PESCConfig(num_experts=8, top_k=2, adapter_dim=64), 16, 8, 256, torch.float32
        peak, name = None, "small"
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(cfg).to(dtype)
    if mode == "qlora":
        quantize_base(net)
    if mode.startswith("pesc") or mode == "qlora":
        upcycle(net, replace(pesc, lora_rank=lora_rank if mode in ("pesc+lora", "qlora") else 0))
    elif mode == "lora":
        add_lora(net, LORA_TARGETS, lora_rank, 16.0, 0.1)
    set_trainable(net, "pesc" if mode == "qlora" else mode.split("+")[0])  # the rule train.setup_model applies
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:  # the optimizer's fp32 master copies, as train.py keeps them
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), fused=cuda)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    targets = idx.roll(-1, dims=1)
    kw = {k: v.to(device) for k, v in attention_inputs((torch.arange(T) // (T // 4)).expand(B, T)).items()}
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            _, loss = net(idx, targets, **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = dict(model=name, B=B, T=T, trainable=sum(p.numel() for p in params), total=net.num_params(), peak=peak)
    return step, info, net


# -----------------------------------------------------------------------------
# Evaluation throughput


def bench_eval(args):
    """eval.py's multiple-choice scoring against the bare forward passes of the same tokens.

    A "small" PESC model (8 experts top-2) and the byte-level tokenizer; two synthetic tasks
    shaped like 5-shot MMLU (4 one-token choices) and HellaSwag (4 endings of ~20 tokens). Three
    times per task: eval's whole path (encoding, batching, log-softmax and gathering, routing
    counts), its model calls alone (eval.row_logits: the prefill and the continuation steps of
    each batch), and those calls with one row per (prompt, choice), as a scorer without prompt
    sharing would run them."""
    import tempfile
    from types import SimpleNamespace

    import eval as ev
    from tokenizer import Tokenizer, write_byte_tokenizer

    torch.manual_seed(0)
    with torch.device(args.device):
        net = upcycle(Transformer(ModelConfig.from_preset("small")), PESCConfig(num_experts=8, top_k=2, adapter_dim=64,
                                                                               adapter_dropout=0.0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(write_byte_tokenizer(os.path.join(tmp, "tokenizer.model")))
    rnd = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join("abcdefghij"[int(i) % 10] * (1 + int(i) % 5) for i in torch.randint(0, 50, (n,), generator=rnd))

    n_items, batch = 32, 16
    tasks = {"mmlu-like": [ev.Item(i, words(60) + "\nAnswer:", ["A", "B", "C", "D"], 0) for i in range(n_items)],
             "hellaswag-like": [ev.Item(i, words(30), [words(5) for _ in range(4)], 0) for i in range(n_items)]}
    opts = SimpleNamespace(batch_size=batch, max_new_tokens=1, quiet=True)
    results = {}
    for name, items in tasks.items():
        task = ev.Task(name, "mc", items)
        requests = [(ev.encode_pair(tok, it.prompt, " " + it.choices[0])[0],
                     [ev.encode_pair(tok, it.prompt, " " + c)[1] for c in it.choices]) for it in items]
        rows = sorted(ev.plan_rows(requests, net.config.max_seq_len),
                      key=lambda r: -(len(r[0]) + sum(len(c) - 1 for c in r[1])))
        single = [(ctx, [c], (r, j)) for ctx, conts, (r, _) in rows for j, c in enumerate(conts)]

        def forward(rows):
            with torch.no_grad():
                for i in range(0, len(rows), batch):
                    ev.row_logits(net, rows[i:i + batch])

        t_eval, t_fwd, t_unshared = race([lambda: ev.run_task(net, tok, task, opts), lambda: forward(rows),
                                          lambda: forward(single)], warmup=1, iters=3, device=args.device)
        tokens = sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts, _ in rows)
        results[name] = dict(items_per_s=n_items / t_eval, forward_items_per_s=n_items / t_fwd,
                             overhead=t_eval / t_fwd, unshared_over_shared=t_unshared / t_fwd)
        print(f"[eval] {name:15s} {n_items} items, {tokens} tokens fed: eval {n_items / t_eval:6.1f} items/s, "
              f"forward alone {n_items / t_fwd:6.1f} items/s (eval/forward {t_eval / t_fwd:.2f}x); one row per "
              f"choice instead: forward {t_unshared / t_fwd:.2f}x longer")
    return results


# -----------------------------------------------------------------------------
# The paper's comparison in small: dense LoRA vs full fine-tuning vs PESC


def bench_compare(args):
    """Instruction-tune one small base three ways and score the three on the same held-out tasks.

    The base is like the demo's (train.py), on a smaller budget: the tiny preset pretrained (1500
    steps of 8 x 128 tokens) on generated "Q: .. A: .." text, then tuned on the demo's
    instructions for the same 300 steps and learning rate as
    --mode lora (rank 8 on all seven linears), --mode full, and --mode pesc (4 experts top-2,
    no LoRA) with adapter_dim chosen so its trainable count matches the LoRA run's. Held out: the
    demo's questions on words never seen in tuning, as an eval.py multiple-choice task (the right
    answer among 3 others of the same skill, "Question: Q\nAnswer:", zero-shot) and as the demo's
    greedy exact match in the chat template. Everything goes to out/compare/."""
    import random

    import eval as ev
    import train as tr
    from tokenizer import Tokenizer, write_byte_tokenizer

    root = "out/compare"
    data_dir, init_dir, base_dir = (os.path.join(root, d) for d in ("data", "init", "base"))
    questions = tr.demo_data(data_dir)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    Transformer(config).save_pretrained(init_dir)
    write_byte_tokenizer(os.path.join(init_dir, "tokenizer.model"))
    with open(os.path.join(init_dir, "tokenizer_config.json"), "w") as f:
        f.write('{"chat_template": "llama3"}')
    common = ["--device", "cpu", "--seq_len", "128", "--batch_size", "8", "--grad_accum_steps", "1", "--beta2", "0.99",
              "--grad_clip", "1.0", "--val_fraction", "0.02", "--log_interval", "100", "--save_interval", "0"]
    tr.train(*tr.parse_args(["--init_from", init_dir, "--data", os.path.join(data_dir, "pretrain.json"),
                             "--out_dir", base_dir, "--mode", "full", "--max_iters", "1500", "--lr", "5e-3",
                             "--lr_schedule", "cosine", "--min_lr", "5e-4", "--warmup_iters", "30",
                             "--eval_interval", "1500", *common]))

    lora_rank, experts, top_k = 8, 4, 2
    lora_trainable = sum(lora_rank * (m.in_features + m.out_features) for layer in Transformer(config).layers
                         for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
                                   layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3))
    per_layer = lora_trainable / config.n_layers - experts * config.dim  # minus the router
    adapter_dim = round(per_layer / (2 * experts * config.dim))
    runs = {"dense LoRA r=8": ["--mode", "lora", "--lora_rank", str(lora_rank), "--lora_alpha", "16",
                               "--lora_dropout", "0"],
            "full fine-tuning": ["--mode", "full"],
            f"PESC {experts}x top-{top_k} r={adapter_dim}": [
                "--mode", "pesc", "--num_experts", str(experts), "--top_k", str(top_k), "--adapter_dim",
                str(adapter_dim), "--adapter_scaling", "1.0", "--adapter_dropout", "0", "--lora_rank", "0"]}

    rng = random.Random(0)
    by_skill = {}
    for name, q, a in questions:
        by_skill.setdefault(name, []).append(a)
    items = []
    for i, (name, q, a) in enumerate(questions):
        others = sorted({x for x in by_skill[name] if x != a} | ({"yes", "no", "7", "3"} - {a}))
        choices = [a] + rng.sample(others, 3)
        rng.shuffle(choices)
        items.append(ev.Item(i, f"Question: {q}\nAnswer:", choices, choices.index(a)))
    task = ev.Task("demo-mc", "mc", items)
    opts = argparse.Namespace(batch_size=16, max_new_tokens=8, quiet=True)

    rows = []
    for label, mode_args in [("dense base (no tuning)", None)] + list(runs.items()):
        out_dir = base_dir
        if mode_args is not None:
            out_dir = os.path.join(root, mode_args[1] + ("" if mode_args[1] != "pesc" else f"-r{adapter_dim}"))
            t0 = time.perf_counter()
            targs = tr.parse_args(["--init_from", base_dir, "--data", os.path.join(data_dir, "sft.json"),
                                   "--out_dir", out_dir, "--max_iters", "300", "--lr", "3e-3", "--warmup_iters", "20",
                                   "--eval_interval", "300", *common, *mode_args])
            trainable = tr.setup_model(targs[0], "cpu", torch.float32, lambda m: None)[0].num_params(True)
            tr.train(*targs)
            seconds = time.perf_counter() - t0
        model = Transformer.from_pretrained(out_dir).eval()
        tok = Tokenizer(out_dir)
        outcomes, _ = ev.run_task(model, tok, task, opts)
        scores = {r["metric"]: r["value"] for r in ev.score_task(task, outcomes)[0]}
        loss, accuracy, _ = tr.demo_eval(out_dir, questions)
        tuned = mode_args is not None
        rows.append((label, f"{trainable:,}" if tuned else "-", f"{seconds:.0f}" if tuned else "-",
                     scores["acc"], scores["acc_norm"], sum(accuracy.values()) / len(accuracy), loss))
    print("\n| run | trainable | tuning s | mc acc | mc acc_norm | exact match (chat) | held-out loss |")
    print("|---|---|---|---|---|---|---|")
    for label, trainable, seconds, acc, acc_norm, em, loss in rows:
        print(f"| {label} | {trainable} | {seconds} | {acc:.3f} | {acc_norm:.3f} | {em:.3f} | {loss:.3f} |")
    return rows


# -----------------------------------------------------------------------------
# The data pipeline at real size: tokenizing into the token cache, a second start

WORDS = ("the of and to in is that for it as with was on be by this are or at from have an which not "
         "but what all were when we there can your more one has their if will each about how up out them "
         "then she many some so these would other into her like him time two see way could people first "
         "water than been call who its now find long down day did get come made may part number sound "
         "answer question explain step because therefore result function value list return print code "
         "python error total sum equation solve given area triangle circle river city history science").split()


def write_sharegpt(path, n, seed=0):
    """A ShareGPT JSONL file of n generated conversations shaped like SlimOrca's: a system prompt in
    half of them, 1-3 turns, short questions and longer answers of common English words."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            turns = [{"from": "system", "value": " ".join(rng.choices(WORDS, k=rng.randint(8, 30)))}] \
                if rng.random() < 0.5 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                turns.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(10, 80))) + "?"})
                turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(20, 250))) + "."})
            f.write(json.dumps({"conversations": turns}) + "\n")


DATA_SEED = 0  # passed to train.py too, so that its second start finds this cache


def build_data_once(spec, tokenizer_dir, cache_dir, seq_len, workers):
    """One first start of the data pipeline in its own process: seconds and peak memory."""
    import resource

    from data import InstructionData
    from tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    idle_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = InstructionData(spec, tok, seq_len, pack_rows=True, val_fraction=0.01, seed=DATA_SEED, cache_dir=cache_dir,
                           workers=workers, log=lambda line: None)
    seconds = time.perf_counter() - t0
    cache_bytes = sum(os.path.getsize(os.path.join(data.cache_path, n)) for n in os.listdir(data.cache_path))
    return dict(seconds=seconds, records=sum(s["records"] for s in data.sources), rows=len(data.train_rows),
                tokens=sum(s["tokens"] for s in data.sources), cache_mib=cache_bytes / 2**20,
                peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, idle_mib=idle_kib / 1024,
                worker_peak_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def put_result(queue, fn, *args):
    queue.put(fn(*args))


def bench_data(args):
    """First start (tokenizing into the token cache) with 1 and 2 workers on a generated
    ShareGPT file, the cache's size, peak memory (the building process and its largest worker;
    also on a quarter of the file, to show it does not grow with the dataset), and a second
    start of train.py with the cache: seconds from launch to the first step's log line."""
    import shutil
    import subprocess
    import sys
    from importlib.util import find_spec

    from tokenizer import write_byte_tokenizer

    root = os.path.join("out", "bench-data")
    os.makedirs(root, exist_ok=True)
    # Meta's Llama 3 tokenizer (the llama-models package ships it); else the byte-level one
    spec = find_spec("llama_models")
    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    meta = os.path.join(os.path.dirname(spec.origin), "llama3", "tokenizer.model") if spec else None
    if meta and os.path.isfile(meta):
        shutil.copy(meta, os.path.join(tok_dir, "tokenizer.model"))
        vocab, tok_name = 128256, "Llama 3 (tiktoken, 128K)"
    else:
        write_byte_tokenizer(os.path.join(tok_dir, "tokenizer.model"))
        vocab, tok_name = 512, "byte-level (512)"
    n = args.conversations
    files = {}
    for count in (n // 4, n):
        files[count] = os.path.join(root, f"sharegpt-{count}.jsonl")
        if not os.path.isfile(files[count]):
            write_sharegpt(files[count], count)
    print(f"[data] {n:,} ShareGPT conversations, {os.path.getsize(files[n]) / 2**20:.0f} MiB of JSONL, "
          f"tokenizer {tok_name}, seq_len {args.seq_len}, packed")
    ctx = multiprocessing.get_context("spawn")  # each build in a fresh process: its own peak memory
    cache = os.path.join(root, "cache")
    for count, workers in ((n // 4, 2), (n, 1), (n, 2)):  # the last leaves the full file's cache
        shutil.rmtree(cache, ignore_errors=True)
        results = ctx.SimpleQueue()  # not a Pool: its daemonic processes may not start the workers
        proc = ctx.Process(target=put_result, args=(results, build_data_once, files[count], tok_dir, cache,
                                                    args.seq_len, workers))
        proc.start()
        r = results.get()
        proc.join()
        print(f"[data] first start, {count:,} conversations, {workers} worker(s): {r['seconds']:.1f} s, "
              f"{r['records'] / r['seconds']:,.0f} conversations/s, {r['tokens'] / r['seconds'] / 1e6:.2f}M tokens/s; "
              f"{r['rows']:,} rows, {r['tokens'] / 1e6:.1f}M tokens, cache {r['cache_mib']:.0f} MiB; peak RSS "
              f"{r['peak_mib']:.0f} MiB (idle {r['idle_mib']:.0f}), largest worker {r['worker_peak_mib']:.0f} MiB")

    # The second start: the data alone (a fresh process mapping the cache), then train.py on a tiny model
    results = ctx.SimpleQueue()
    proc = ctx.Process(target=put_result, args=(results, build_data_once, files[n], tok_dir, cache, args.seq_len, 2))
    proc.start()
    r = results.get()
    proc.join()
    print(f"[data] second start, data only: {r['seconds']:.2f} s to InstructionData from the cache "
          f"({r['rows']:,} rows mapped), peak RSS {r['peak_mib']:.0f} MiB (idle {r['idle_mib']:.0f})")
    # train.py on a tiny model with this tokenizer, the cache already built
    ckpt = os.path.join(root, "tiny")
    Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=args.seq_len)).save_pretrained(ckpt)
    shutil.copy(os.path.join(tok_dir, "tokenizer.model"), os.path.join(ckpt, "tokenizer.model"))
    cmd = [sys.executable, "train.py", "--init_from", ckpt, "--data", files[n], "--cache_dir", cache,
           "--out_dir", os.path.join(root, "run"), "--device", "cpu", "--seq_len", str(args.seq_len),
           "--batch_size", "1", "--grad_accum_steps", "1", "--max_iters", "1", "--eval_interval", "0",
           "--seed", str(DATA_SEED), "--val_fraction", "0.01", "--pack", "true",
           "--num_experts", "4", "--adapter_dim", "8", "--lora_rank", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    marks = {}
    for line in proc.stdout:
        for name, start in (("cache mapped", "token cache: reading"), ("loop", "training "), ("first step", "iter 1:")):
            if line.startswith(start) and name not in marks:
                marks[name] = time.perf_counter() - t0
        if len(marks) == 3:  # what comes after (the held-out eval, the export) is not the start
            proc.kill()
            break
    proc.wait()
    assert len(marks) == 3, (proc.returncode, marks)
    print(f"[data] second start (train.py, cache built): {marks['cache mapped']:.1f} s to the cache mapped, "
          f"{marks['loop']:.1f} s to the training loop (model loaded, first batch next), "
          f"{marks['first step']:.1f} s to the first step's log line")


# -----------------------------------------------------------------------------
# Loading a base for train.py --fsdp


def bench_fsdp_load(args):
    """Peak resident memory per rank while 2 CPU ranks (gloo) load a ~1B-parameter random fp32
    checkpoint as train.py --fsdp does (memory-mapped files, cast and sharded block by block, each
    rank keeping its shard of every tensor; with lora+nf4 the base quantized to NF4 as it streams
    in, then its bytes sharded), against the whole-model load of DDP. The fixed
    overhead is the rank's peak before loading (torch, gloo); each mode runs in fresh processes."""
    import tempfile

    from model import write_checkpoint

    cfg = ModelConfig(dim=2048, n_layers=18, n_heads=16, ffn_dim=5632, vocab_size=32000)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = ((k, torch.randn(s, generator=gen) * 0.02) for k, s in shapes.items())  # one at a time
    model_mib = sum(math.prod(s) for s in shapes.values()) * 4 / 2**20
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as d:
        write_checkpoint(d, cfg.to_dict(), tensors, max_shard_bytes=2**30)
        print(f"[fsdp_load] random checkpoint: {sum(math.prod(s) for s in shapes.values()) / 1e9:.2f}B parameters, "
              f"fp32, {model_mib:.0f} MiB")
        for how, mode in (("fsdp", "lora"), ("fsdp", "pesc"), ("fsdp", "lora+nf4"), ("whole", "lora")):
            queue, port = ctx.Queue(), 29500 + os.getpid() % 1000
            procs = [ctx.Process(target=fsdp_load_worker, args=(rank, 2, port, d, how, mode, queue)) for rank in (0, 1)]
            for p in procs:
                p.start()
            results = sorted(queue.get(timeout=1200) for _ in procs)
            for p in procs:
                p.join()
            for r in results:
                print(f"[fsdp_load] {how:5s} --mode {mode}: rank {r[0]}: fixed overhead {r[1]:.0f} MiB, peak RSS "
                      f"{r[2]:.0f} MiB, peak - overhead {r[2] - r[1]:.0f} MiB = {(r[2] - r[1]) / model_mib:.2f} of the "
                      f"model; holds {r[3]:.0f} MiB of parameters")


def fsdp_load_worker(rank, world, port, ckpt, how, mode, queue):
    """One rank of bench_fsdp_load: (rank, fixed overhead MiB, peak RSS MiB, parameter MiB held)."""
    import torch.distributed as dist

    import train

    def peak_mib():  # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    idle = peak_mib()
    mode, _, quantize = mode.partition("+")  # lora+nf4: QLoRA, the NF4 base sharded too
    args = train.parse_args(["--init_from", ckpt, "--mode", mode, "--dtype", "float32", "--quantize", quantize])[0]
    torch.manual_seed(0)
    net, _ = train.setup_model(args, "cpu", torch.float32, lambda *a: None, sharded=how == "fsdp")
    if how == "fsdp":
        train.shard_model(net, args, torch.float32, train.Dist(True, rank, world, "cpu", "cpu", fsdp=True))
    local = [p.to_local() if how == "fsdp" else p for p in net.parameters()]
    # read every byte a rank holds, as a training step does: mapped pages count once touched
    touched = sum(float(t.detach().sum()) for t in local)
    held = sum(t.numel() * t.element_size() for t in local)
    dist.barrier()
    queue.put((rank, idle, peak_mib(), held / 2**20, touched))
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# LoRA: the fused linears vs their plain twin vs transformers + PEFT (CPU)


def bench_lora(args):
    """Forward + backward (no optimizer) of a 2-layer LLaMA (d 1024, ffn 2816, vocab 32000, batch
    4 x 512, fp32) with LoRA r=64, alpha 16, dropout 0 on all seven linears, base frozen: this
    project's fused LoRA linears, the plain twin, and transformers + PEFT (optional, imported
    here only). The runs alternate and each reports its median, on a shared noisy machine."""
    import statistics

    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=2, n_heads=16, ffn_dim=2816, max_seq_len=512)
    B, T, r = 4, 512, 64
    torch.manual_seed(0)
    net = set_trainable(add_lora(Transformer(cfg), LORA_TARGETS, r, 16.0, 0.0), "lora")
    idx = torch.randint(0, cfg.vocab_size, (B, T))

    def project_step():
        net(idx, idx)[1].backward()

    def plain_step():
        saved, moe.lora_linear = moe.lora_linear, moe.lora_linear_plain
        try:
            project_step()
        finally:
            moe.lora_linear = saved

    steps = {"fused": project_step, "plain": plain_step}
    try:  # the comparison only: loaded by name, so no code path of the project depends on them
        peft = importlib.import_module("peft")
        transformers = importlib.import_module("transformers")

        hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                          max_position_embeddings=T, attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=targets))

        def peft_step():
            hf(input_ids=idx, labels=idx).loss.backward()
        steps["peft"] = peft_step
    except ImportError as e:
        print(f"[lora] transformers + PEFT not installed ({e.name}): timing this project only")
    times = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(getattr(args, "iters", 7)):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    res = {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}
    line = " | ".join(f"{name} {res[f'{name}_ms']:7.0f} ms" for name in steps)
    print(f"[lora] d {cfg.dim}, {cfg.n_layers} layers, ffn {cfg.ffn_dim}, {B}x{T}, r={r} on all seven, "
          f"fwd+bwd, {torch.get_num_threads()} threads, medians of {len(times['fused'])}: {line}")
    if "peft" in steps:
        res["peft_over_fused"] = res["peft_ms"] / res["fused_ms"]
        print(f"  fused is {res['peft_over_fused']:.2f}x the speed of PEFT; plain {res['peft_ms'] / res['plain_ms']:.2f}x")
    return res


# -----------------------------------------------------------------------------
# bench.py --gpu --out DIR: the first check on a machine with one GPU

# The parts in the order they run, most valuable first, each with the seconds it may run before
# it is stopped. Guesses for the H200 at the 7B shape with margin; none has been timed on one
# yet. The Inductor compiles come last (training, then the CUDA-graph decode), so a slow compile
# is what the budget cuts; eager decode and the bandwidth it is measured against come before them.
GPU_PART_LIMITS_S = {
    "tests": 180, "logits_bf16_vs_fp32_cpu": 45,
    "train_pesc_eager": 45, "train_lora_eager": 45, "train_pesc_triton": 75, "train_lora_triton": 75,
    "bandwidth": 20, "decode_eager": 45,
    "train_pesc_compiled": 100, "train_lora_compiled": 100, "decode_compiled": 100,
}


def gpu_check(out_dir, device="cuda", shape="llama2-7b", layers=4, seq_len=2048, budget_s=450.0):
    """Every part of the GPU check in turn, each isolated (a failure is recorded, the rest runs)
    and each stopped at its GPU_PART_LIMITS_S limit or at the end of budget_s, whichever comes
    first; a part that would start with under a quarter of its limit left is skipped. Rewrites
    gpu_check.json and gpu_check.md in out_dir before and after every part (so a run killed from
    outside leaves the finished parts and the one in flight) and returns the results. device="cpu"
    with a tiny shape runs the parts that a CPU can (the tests of this function do)."""
    import gc
    import traceback

    import torch._dynamo

    start = time.perf_counter()
    results = {"torch": torch.__version__, "triton": getattr(kernels.triton, "__version__", None),
               "device": torch.cuda.get_device_name() if device == "cuda" else device,
               "budget_s": budget_s, "running": None, "finished": False, "parts": {}, "goals": {}}
    cuda = device == "cuda"
    parts = {"tests": lambda limit: check_tests(limit) if cuda else {"skipped": "CPU"},
             "logits_bf16_vs_fp32_cpu": lambda limit: check_logits(device),
             "bandwidth": lambda limit: check_bandwidth(device)}
    for kind in ("lora", "pesc"):
        for mode in ("eager", "compiled", "triton"):
            parts[f"train_{kind}_{mode}"] = lambda limit, k=kind, m=mode: check_train(device, shape, layers, seq_len, k, m)
    for mode in ("eager", "compiled"):
        parts[f"decode_{mode}"] = lambda limit, c=mode == "compiled": check_decode(device, shape, layers, c, results["parts"])

    def save():
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        results["goals"] = gpu_goals(results["parts"])
        write_gpu_check(out_dir, results)

    os.makedirs(out_dir, exist_ok=True)
    for name, full_limit in GPU_PART_LIMITS_S.items():
        left = budget_s - (time.perf_counter() - start)
        if left < full_limit / 4:
            why = f"{max(left, 0):.0f} s of {budget_s:g} s left, under a quarter of this part's {full_limit:g} s limit"
            results["parts"][name] = {"skipped": f"time budget: {why}", "seconds": 0.0}
            print(f"[gpu] {name}: {results['parts'][name]['skipped']}", flush=True)
            save()
            continue
        limit = min(full_limit, left)
        results["running"] = name
        save()
        t0 = time.perf_counter()
        try:
            with time_limit(limit) as alarm:
                r = parts[name](limit)
        except Exception as e:  # reported, and the next part runs
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            if alarm.fired:  # also when a library wrapped the TimeoutError (Dynamo does)
                r["error"] = f"timeout: stopped after its {limit:.3g} s limit ({r['error']})"
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["parts"][name] = r
        results["running"] = None
        save()
        print(f"[gpu] {name}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("traceback", "output")),
              flush=True)
        torch._dynamo.reset()  # drop the compiled graphs (and their memory) of this part
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    results["finished"] = True
    save()
    for goal in results["goals"].values():
        print(f"[gpu] goal {goal['goal']}: {goal['status']} ({goal['detail']})", flush=True)
    return results


@contextmanager
def time_limit(seconds):
    """Raise TimeoutError in the block once it has run `seconds` (SIGALRM via setitimer); yields
    an object whose .fired says whether it did. The previous handler and timer are restored.
    The signal is handled between Python bytecodes, so a C call that never returns (a hung
    kernel inside a synchronize) is not cut short; the files gpu_check rewrites per part cover
    that case. Off the main thread, or without setitimer, there is no limit."""
    import signal
    import threading
    from types import SimpleNamespace

    alarm = SimpleNamespace(fired=False)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield alarm
        return

    def on_alarm(signum, frame):
        alarm.fired = True
        raise TimeoutError(f"ran past {seconds:.1f} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:  # an outer timer (pytest-timeout's, say) keeps what it had left
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


def write_gpu_check(out_dir, results):
    """gpu_check.json and gpu_check.md in out_dir, each written to a temp name then renamed."""
    import json

    for fname, text in (("gpu_check.json", json.dumps(results, indent=2)), ("gpu_check.md", gpu_check_table(results))):
        path = os.path.join(out_dir, fname)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def gpu_check_table(results):
    state = (f"finished in {results['elapsed_s']} s" if results["finished"] else
             f"not finished: running {results['running']} at {results['elapsed_s']} s")
    lines = [f"# GPU check: {results['device']}, torch {results['torch']}, triton {results['triton']}", "",
             f"Time budget {results['budget_s']:g} s; {state}.", "",
             "| part | result | seconds |", "|---|---|---|"]
    for name, r in results["parts"].items():
        shown = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("traceback", "seconds", "output"))
        lines.append(f"| {name} | {shown.replace('|', '/')} | {r['seconds']} |")
    lines += ["", "| goal | status | measured |", "|---|---|---|"]
    for goal in results["goals"].values():
        lines.append(f"| {goal['goal']} | {goal['status']} | {goal['detail'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def gpu_goals(parts):
    """The goals of the GPU check, each {"goal", "status": "met" | "not met" | "unmeasured",
    "detail"}, from the numbers in parts alone: a part that failed, was skipped or has no such
    number (no MFU on a CPU) is unmeasured, and no goal is met on a missing number."""
    modes = ("eager", "triton", "compiled")

    def number(name, key):
        return parts.get(name, {}).get(key)

    def best_of(goal, values, target):
        """Met when some measured value reaches target (the best of them then does too); not met
        only when every value was measured."""
        got = {m: v for m, v in values.items() if v is not None}
        missing = [m for m in values if m not in got]
        shown = ", ".join(f"{m} {v}" for m, v in got.items()) or "nothing measured"
        shown += f"; unmeasured: {', '.join(missing)}" if missing and got else ""
        if got and max(got.values()) >= target:
            status = "met"
        else:
            status = "unmeasured" if missing else "not met"
        return {"goal": goal, "status": status, "detail": shown}

    mfu = {m: number(f"train_pesc_{m}", "mfu") for m in modes}
    share = {m: number(f"decode_{m}", "share_of_bound") for m in ("eager", "compiled")}
    goals = {"pesc_mfu": best_of("PESC train step MFU >= 0.40 (best of eager/triton/compiled)", mfu, 0.40),
             "decode_share_of_bound": best_of("decode >= 0.6 of the bandwidth bound (best of eager/compiled)", share, 0.6)}

    # The PESC step against dense LoRA's in PESC's fastest mode, which is only known when every
    # PESC mode was timed
    pesc = {m: number(f"train_pesc_{m}", "step_ms") for m in modes}
    ratios = {m: round(pesc[m] / number(f"train_lora_{m}", "step_ms"), 3) for m in modes
              if pesc[m] is not None and number(f"train_lora_{m}", "step_ms")}
    detail = ", ".join(f"{m} {v}x" for m, v in ratios.items()) or "nothing measured"
    if None in pesc.values():
        status = "unmeasured"
        detail += f"; PESC unmeasured: {', '.join(m for m, v in pesc.items() if v is None)}"
    else:
        fastest = min(pesc, key=pesc.get)
        if fastest not in ratios:
            status, detail = "unmeasured", detail + f"; dense LoRA unmeasured in PESC's fastest mode, {fastest}"
        else:
            status = "met" if ratios[fastest] <= 1.15 else "not met"
            detail += f"; PESC fastest {fastest}"
    goals["pesc_vs_lora_step"] = {"goal": "PESC step <= 1.15x the dense-LoRA step (PESC's fastest mode)",
                                  "status": status, "detail": detail}

    tests = parts.get("tests", {})
    goals["tests"] = {"goal": "kernel and model tests pass on the device",
                      "status": {True: "met", False: "not met"}.get(tests.get("passed"), "unmeasured"),
                      "detail": tests.get("summary") or tests.get("error") or tests.get("skipped") or "not run"}
    return goals


def check_tests(timeout):
    """The kernel and model tests on the GPU, the Triton kernels compiled (no interpreter); pytest
    gets a few seconds less than timeout, so its own output tail is kept when it runs long."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", PESC_TEST_DEVICE="cuda")
    # no -x: the first GPU run should report every failing test, not the first
    cmd = [sys.executable, "-m", "pytest", "-q", "--no-header", "tests/test_kernels.py", "tests/test_model.py"]
    timeout = max(timeout - 5, 0.8 * timeout)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"error": f"pytest ran past {timeout:.0f} s", "output": "\n".join(out.strip().splitlines()[-30:])}
    tail = (p.stdout + p.stderr).strip().splitlines()
    return {"passed": p.returncode == 0, "summary": tail[-1] if tail else "", "output": "\n".join(tail[-30:])}


def check_logits(device):
    """A tiny random PESC model through the real converter, exported Camelidae-style (export_hf)
    and imported back in bf16 (convert_checkpoint): its tensors against the original's rounded
    to bf16 (exact), then its bf16 logits on the device against the original's fp32 CPU logits."""
    import contextlib
    import copy
    import io
    import tempfile

    from convert import convert_checkpoint, export_hf

    torch.manual_seed(0)
    # top_k = num_experts: no expert choice to flip when bf16 rounding meets a near tie between
    # the k-th expert and the next (one token's logits would then move by an adapter's worth)
    cfg = ModelConfig.from_preset("tiny", moe=PESCConfig(num_experts=4, top_k=4, adapter_dim=16, adapter_dropout=0.0))
    net = Transformer(cfg).eval().requires_grad_(False)
    # a small embedding beside the blocks' outputs and adapters of about unit gain, so that the
    # blocks and adapters move the logits by more than the bound below (adapter_effect says how much)
    net.tok_embeddings.weight.normal_(0, 0.1)
    for ff in pesc_layers(net):
        ff.adapter_down.mul_(3)
        ff.adapter_up.normal_(0, cfg.moe.adapter_dim ** -0.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(os.path.join(tmp, "project"))
        log = io.StringIO()  # the converter's progress lines and its no-tokenizer warning
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            hf = export_hf(os.path.join(tmp, "project"), os.path.join(tmp, "hf"))
            converted = convert_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "back"), dtype="bf16")
        back = Transformer.from_pretrained(os.path.join(tmp, "back"))
    expected_state = {k: t.to(torch.bfloat16) for k, t in net.state_dict().items()}
    got_state = back.state_dict()
    weights_exact = got_state.keys() == expected_state.keys() and all(
        t.dtype == torch.bfloat16 and torch.equal(t, expected_state[k]) for k, t in got_state.items())
    low = back.to(device)
    no_adapters = copy.deepcopy(net)
    for ff in pesc_layers(no_adapters):
        ff.adapter_up.zero_()
    with torch.no_grad():
        expected = net(idx)[0]
        adapter_effect = (no_adapters(idx)[0] - expected).abs().max().item()
        got = low(idx.to(device))[0].float().cpu()
    err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    # bf16 weights and activations, sums in fp32: a few bf16 roundings per element in every
    # layer, the layers adding their errors (tests/tolerance.py's rule, 8 ulps, reduction n_layers)
    bound = 8 * torch.finfo(torch.bfloat16).eps * cfg.n_layers ** 0.5 * scale
    same_config = converted == cfg
    return {"layout": hf["model_type"], "config_round_trip": same_config, "weights_exact": weights_exact,
            "max_abs_err": round(err, 5), "bound": round(bound, 5), "adapter_effect": round(adapter_effect, 5),
            "ok": same_config and weights_exact and err <= bound < adapter_effect,
            "argmax_agree": round((got.argmax(-1) == expected.argmax(-1)).float().mean().item(), 4)}


def check_bandwidth(device):
    """Copy bandwidth of the device (bytes read + written per second): the decode bound."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), warmup=2, iters=5, device=device)
    return {"GB_per_s": round(2 * n / t / 1e9, 1)}


def gpu_check_model(device, shape, layers, kind, dtype):
    cfg = ModelConfig.from_preset(shape, n_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(cfg).to(dtype).requires_grad_(False)
    net.inv_freq = model.rope_inv_freq(cfg).to(device)  # RoPE's frequencies stay fp32, as train.py keeps them
    if kind == "pesc":
        upcycle(net, PESCConfig(num_experts=8, top_k=2, adapter_dim=512 if shape != "tiny" else 16, adapter_dropout=0.0))
        with torch.no_grad():
            for ff in pesc_layers(net):
                ff.adapter_up.normal_(0, 0.02)
    elif kind == "lora":
        add_lora(net, LORA_TARGETS, 64 if shape != "tiny" else 4, 16.0, 0.0)
    return set_trainable(net, kind) if kind != "dense" else net


def check_train(device, shape, layers, seq_len, kind, mode):
    """One training step (forward, backward, fused AdamW) of the dense-LoRA or PESC model."""
    import train

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    net = gpu_check_model(device, shape, layers, kind, dtype)
    if mode == "compiled":
        train.compile_blocks(net, **({} if cuda else {"backend": "aot_eager"}))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    B = 2
    idx = torch.randint(0, net.config.vocab_size, (B, seq_len), device=device)

    def step():
        net(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with kernel_mode("triton" if mode == "triton" else "torch"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt = timeit(step, warmup=2, iters=3, device=device)
    tps = B * seq_len / dt
    r = {"tokens_per_s": round(tps), "step_ms": round(1e3 * dt, 1)}
    peak = peak_flops(device, dtype)
    if peak is not None:
        r["mfu"] = round(net.estimate_mfu(tps, seq_len, peak), 4)
    if cuda:
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return r


def check_decode(device, shape, layers, compiled, done):
    """Greedy decode tokens/s, batch 1, against the bound: weights + KV cache read once per token
    at the copy bandwidth measured in the bandwidth part."""
    from sample import compile_decode_step

    cuda = device == "cuda"
    net = gpu_check_model(device, shape, layers, "dense", torch.bfloat16 if cuda else torch.float32).eval()
    prompt_len, new = 128, 64
    prompt = torch.randint(0, net.config.vocab_size, (1, prompt_len), device=device)
    step = compile_decode_step(device, **({} if cuda else {"backend": "aot_eager"})) if compiled else None
    kw = dict(decode_fn=step, static_cache=True) if compiled else {}
    stamps = []

    def on_token(ids):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    generate(net, prompt, 8, temperature=0, **kw)  # warm-up (compiles)
    stamps.clear()
    generate(net, prompt, new, temperature=0, on_token=on_token, **kw)
    # from the second decode step: a new generate() makes a new KV cache, so the compiled step's
    # CUDA graph is recorded again at its first step
    tps = (len(stamps) - 2) / (stamps[-1] - stamps[1])
    r = {"tokens_per_s": round(tps, 1)}
    bw = done.get("bandwidth", {}).get("GB_per_s")
    if bw:
        c = net.config
        cache_slots = max(256, 1 << (prompt_len + new - 1).bit_length()) if compiled else prompt_len + new
        kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * cache_slots * net.output.weight.element_size()
        nbytes = sum(p.numel() * p.element_size() for p in net.parameters()) - net.tok_embeddings.weight.nbytes + kv
        bound = bw * 1e9 / nbytes  # tokens/s if every byte were read once at the copy bandwidth
        r.update(bound_tokens_per_s=round(bound, 1), share_of_bound=float(f"{tps / bound:.3g}"))  # 3 digits, also on a CPU
    return r


# -----------------------------------------------------------------------------
# vLLM serving (serve/): run with the serve venv's python (README: Serving), not in the default set


def bench_serve(args, steps=64, dim=1024, layers=8):
    """Generated tokens/s of vLLM's OpenAI server at 1, 8 and 32 concurrent greedy requests (each
    exactly `steps` tokens), PESC (8 experts, top-2, adapter dim dim/8 as Camelidae's 512/4096) beside
    the same dense base, and sample.generate at batch 1 and 32; fp32, eager, random weights."""
    import concurrent.futures
    import socket
    import subprocess
    import sys
    import tempfile
    import urllib.request

    from openai import OpenAI

    from convert import export_hf
    from tokenizer import write_byte_tokenizer

    root = tempfile.mkdtemp(prefix="bench_serve_")
    prompts = [[256] + [(7 * i + j) % 256 for j in range(24)] for i in range(32)]  # BOS + 24 bytes, all different
    for kind in ("dense", "pesc"):
        torch.manual_seed(0)
        net = Transformer(ModelConfig(vocab_size=512, dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 128,
                                      ffn_dim=int(dim * 2.75), max_seq_len=256))
        if kind == "pesc":
            upcycle(net, PESCConfig(num_experts=8, top_k=2, adapter_dim=dim // 8, adapter_dropout=0.0))
            for ff in pesc_layers(net):
                torch.nn.init.normal_(ff.adapter_up, std=0.02)
        ckpt, hf = os.path.join(root, kind), os.path.join(root, kind + "-hf")
        net.eval().save_pretrained(ckpt)
        write_byte_tokenizer(os.path.join(ckpt, "tokenizer.model"))
        export_hf(ckpt, hf)
        for batch in (1, 32):
            t = timeit(lambda: generate(net, prompts[:batch], steps, temperature=0), warmup=1, iters=2)
            print(f"serve {kind}: sample.generate batch {batch}: {batch * steps / t:.1f} tokens/s")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = open(os.path.join(root, kind + ".log"), "w")
        server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf, "--port",
                                   str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ})  # GiB; else 92% of RAM
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None, f"vLLM server failed; see {log.name}"
                    time.sleep(1)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)

            def requests(n):  # n greedy completions at once, each exactly `steps` tokens
                with concurrent.futures.ThreadPoolExecutor(n) as pool:
                    counts = list(pool.map(lambda p: client.completions.create(
                        model=hf, prompt=p, max_tokens=steps, temperature=0,
                        extra_body={"ignore_eos": True}).usage.completion_tokens, prompts[:n]))
                assert counts == [steps] * n, counts

            for n in (1, 8, 32):  # the fastest of 3 rounds after a warm-up round
                print(f"serve {kind}: vLLM {n} concurrent: {n * steps / timeit(lambda: requests(n), 1, 3):.1f} tokens/s")
        finally:
            os.killpg(server.pid, 15)
            server.wait()


SECTIONS = {"lora": bench_lora, "moe": bench_moe, "decode": bench_decode, "kernels": bench_kernels, "model": bench_model,
            "train": bench_train, "quant": bench_quant, "quant7b": bench_quant7b, "eval": bench_eval,
            "compare": bench_compare, "data": bench_data,
            "fsdp_load": bench_fsdp_load}
OPT_IN = {"serve": bench_serve}  # only by name (--only serve): it needs vLLM, in the serve venv


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=8, help="decoder layers in the 'model' section")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--gpu", action="store_true", help="the prepared check for a 1-GPU machine (with --out)")
    p.add_argument("--out", default=None, help="--gpu: directory for gpu_check.json and gpu_check.md")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="--gpu: seconds for the whole check; parts that do not fit are skipped (default 450)")
    p.add_argument("--conversations", type=int, default=200_000, help="size of the generated set in 'data'")
    p.add_argument("--seq_len", type=int, default=2048, help="rows of the 'data' section")
    args = p.parse_args()
    if args.gpu:
        if args.out is None:
            p.error("--gpu needs --out DIR")
        if not torch.cuda.is_available():
            raise SystemExit("bench.py --gpu: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), "
                             "so there is nothing to check; run it on the GPU machine")
        gpu_check(args.out, budget_s=args.budget_s)
        return
    sections = {**SECTIONS, **OPT_IN}
    for name in args.only.split(","):
        if name not in sections:
            p.error(f"unknown section {name!r}; known: {', '.join(sections)}")
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads")
    for name in args.only.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
