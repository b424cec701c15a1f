"""
Benchmarks. Each section warms up, then times; numbers go to BENCHMARKS.md by hand, with the
machine, the date and the command.

    python bench.py                      # every section that fits the device
    python bench.py --only moe           # one PESC layer vs the dense FFN (CPU, issue 3 sizes)
    python bench.py --only decode,train  # generation and training throughput
    python bench.py --only model --device cuda     # a Llama-2-7B-shaped PESC model training (GPU)
    python bench.py --only kernels --device cuda   # Triton kernels vs their twins (GPU)
    python bench.py --only fsdp_load     # peak memory per rank loading a 1B base for --fsdp (CPU, 2 ranks)
"""

import argparse
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
from data import attention_inputs
from model import FeedForward, ModelConfig, Transformer
from moe import LORA_TARGETS, PESCConfig, PESCFeedForward, add_lora, pesc_layers, upcycle
from sample import DTYPES, generate
from train import PEAK_FLOPS


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
# One PESC layer vs the dense FFN (issue 3)


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
    layer = PESCFeedForward(ffn, PESCConfig(num_experts=E, top_k=k, adapter_dim=r, adapter_dropout=0.0)).to(dev)
    with torch.no_grad():
        layer.adapter_up.normal_(0, 0.02)
    x = torch.randn(1, N, D, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(1, N, D, device=dev, dtype=dt)

    def dense_step():
        ffn(x).backward(g)

    def pesc_step():
        layer(x).backward(g)

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
# Decoding (issue 5)


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
# Triton kernels vs their PyTorch twins (issue 7, GPU)


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
    layer = PESCFeedForward(ffn, PESCConfig(num_experts=E, top_k=k, adapter_dim=r)).train()
    with torch.no_grad():
        layer.adapter_up.normal_(0, 0.02)  # zero at upcycling; trained adapters are not
    trainable = [p for p in layer.parameters() if p.requires_grad]  # router + adapters
    xl = randn(B, T, D, grad=True)
    print(f"  PESC layer (E={E}, k={k}, r={r}, s=0.25, dropout 0.1) vs dense frozen FFN, {B}x{T} tokens:")
    for mode in ("triton", "torch"):
        with kernel_mode(mode):
            d_ms, d_mib = measure(fwd_bwd(ffn, (xl,)))
            p_ms, p_mib = measure(fwd_bwd(layer, (xl,), trainable))
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
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), 989e12)

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
# Training throughput per mode (issue 6)


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


def train_step_bench(mode, device, layers):
    """One mode of bench_train, in its own process."""
    import resource

    cuda = device.startswith("cuda")
    idle_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process before the model (KiB on Linux)
    if cuda:
        cfg = ModelConfig.from_preset("llama2-7b", n_layers=layers)
        pesc, lora_rank, B, T, dtype = PESCConfig.from_preset("camelidae-8x7b"), 64, 4, 1024, torch.bfloat16
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        name = f"llama2-7b x {layers} layers"
    else:
        cfg = ModelConfig.from_preset("small")
        pesc, lora_rank, B, T, dtype = PESCConfig(num_experts=8, top_k=2, adapter_dim=64), 16, 8, 256, torch.float32
        peak, name = None, "small"
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(cfg).to(dtype)
    if mode.startswith("pesc"):
        upcycle(net, replace(pesc, lora_rank=lora_rank if mode == "pesc+lora" else 0))
    elif mode == "lora":
        net.requires_grad_(False)
        add_lora(net, LORA_TARGETS, lora_rank, 16.0, 0.1)
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

    dt = timeit(step, warmup=2, iters=5, device="cuda" if cuda else "cpu")
    tps = B * T / dt
    r = dict(model=name, B=B, T=T, tokens_per_s=tps, trainable=sum(p.numel() for p in params),
             total=net.num_params())
    if cuda:
        r["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if peak is not None:
            r["mfu"] = net.estimate_mfu(tps, T, peak)
    else:
        r["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r["peak_above_idle_mib"] = r["peak_mib"] - idle_kib / 1024
    return r


# -----------------------------------------------------------------------------
# Loading a base for train.py --fsdp (issue 15)


def bench_fsdp_load(args):
    """Peak resident memory per rank while 2 CPU ranks (gloo) load a ~1B-parameter random fp32
    checkpoint as train.py --fsdp does (memory-mapped files, cast and sharded block by block, each
    rank keeping its shard of every tensor), against the whole-model load of DDP. The fixed
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
        for how, mode in (("fsdp", "lora"), ("fsdp", "pesc"), ("whole", "lora")):
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
    args = train.parse_args(["--init_from", ckpt, "--mode", mode, "--dtype", "float32"])[0]
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

SECTIONS = {"moe": bench_moe, "decode": bench_decode, "kernels": bench_kernels, "model": bench_model, "train": bench_train,
            "fsdp_load": bench_fsdp_load}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=8, help="decoder layers in the 'model' section")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    args = p.parse_args()
    for name in args.only.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads")
    for name in args.only.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
