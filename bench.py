"""
Benchmarks a user runs. Each section warms up, then reports the fastest (or median) of several
timed runs; numbers go to BENCHMARKS.md by hand, with the machine, the date and the command.

    python bench.py                          # the quick sections: moe, decode, train (< 2 min on 2 CPU cores)
    python bench.py --only lora,quant,data   # sections by name (moe decode train lora kernels quant data), or all
    .venv-serve/bin/python bench.py --only serve   # vLLM serving PESC vs dense (the serve venv: README, Serving)
    python bench.py --device cuda --only train,kernels,decode   # on a GPU (train reports MFU)
    python bench.py --gpu --out_dir DIR      # the prepared 1-GPU check: the GPU tests, then those three

The PESC-vs-LoRA experiment, which trains models, is study.py.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from unittest.mock import patch

import torch
import torch.nn.functional as F

import cli
import kernels
import model
import moe
import quant
import train
from data import attention_inputs
from files import write_atomic, write_json
from model import FeedForward, ModelConfig, Transformer, peak_flops
from moe import PESCConfig, PESCFeedForward
from sample import generate

QUICK = ("moe", "decode", "train")


def race(fns, warmup=2, iters=7, device="cpu"):
    """Fastest of `iters` timed calls of each fn, in seconds. The calls take turns (round robin),
    so a slow spell of the machine falls on all of them rather than on whichever ran then."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def kernel_mode(mode):
    """PESC_KERNELS=mode inside a with block: triton (the Triton kernels) or torch (their twins)."""
    return patch.dict(os.environ, {"PESC_KERNELS": mode})


def in_fresh_process(fn, *args):
    """fn(*args) in a new process (spawned: nothing inherited), for its own peak memory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def peak_rss_mib():
    with open("/proc/self/status") as f:  # VmHWM: this process's peak resident set
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


# -----------------------------------------------------------------------------
# One PESC layer vs the dense FFN


def bench_moe(args):
    """One FFN layer forward + backward, the FFN frozen: dense vs PESC (router and adapters trained);
    then the MoE part alone (router, dispatch, adapters, combine) on a fixed FFN output: the fast
    path (moe.adapter_experts) vs the reference loop. CPU: dim 1024, ffn 2816, 8 experts top-2, r 64, 4096 tokens, fp32; GPU:
    Camelidae-8x7B's sizes (dim 4096, ffn 11008, r 512, dropout 0.1), 8192 tokens, bf16."""
    dev = cli.resolve_device(args.device)
    dtype = cli.resolve_dtype(args.dtype, dev)
    D, F_, r, N, p = (4096, 11008, 512, 8192, 0.1) if dev.type == "cuda" else (1024, 2816, 64, 4096, 0.0)
    torch.manual_seed(0)
    cfg = PESCConfig(adapter_dim=r, adapter_dropout=p)
    ffn = FeedForward(D, F_).to(dev, dtype).requires_grad_(False)
    layer = PESCFeedForward(ffn, cfg).train()
    torch.nn.init.normal_(layer.adapter_up, 0, 0.02)  # zero at upcycling; trained adapters are not
    x, y, g = (torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    adapters = [lambda fn=fn: fn(y, *moe.route(layer.router(x.detach()), cfg.top_k), layer.adapter_down,
                                 layer.adapter_up, 0.25, p, True).backward(g) for fn in (moe.adapter_experts,
                                                                                          moe.adapter_experts_loop)]
    t_dense, t_pesc, t_fast, t_loop = race([lambda: ffn(x[None]).backward(g[None]),
                                            lambda: layer(x[None], cfg)[0].backward(g[None]), *adapters], device=dev)
    flop_ratio = (3 * F_ + (cfg.top_k * 2 * r + cfg.num_experts) * 1.5) / (3 * F_)  # the new tensors' weight grads too
    print(f"[moe] N={N} dim={D} ffn={F_} E={cfg.num_experts} k={cfg.top_k} r={r} {str(dtype)[6:]} {dev}: dense FFN "
          f"{1e3 * t_dense:.1f} ms, PESC layer {1e3 * t_pesc:.1f} ms, ratio {t_pesc / t_dense:.3f} (FLOPs "
          f"{flop_ratio:.3f}); adapters alone: fast path {1e3 * t_fast:.1f} ms, loop {1e3 * t_loop:.1f} ms")
    return dict(dense_ms=1e3 * t_dense, pesc_ms=1e3 * t_pesc, fast_ms=1e3 * t_fast, loop_ms=1e3 * t_loop)


# -----------------------------------------------------------------------------
# Decoding: the KV cache vs recomputing the sequence


def bench_decode(args):
    """Greedy decode tokens/s, batch 1, through sample.generate's KV cache, timed from the second
    new token: a small model (dim 512, 8 layers, vocab 32000; on a GPU Llama-2-7B's first --layers
    layers), dense, then PESC (8 experts top-2, r 64, trained-looking adapters)."""
    dev = cli.resolve_device(args.device)
    dtype = cli.resolve_dtype(args.dtype, dev)
    config = ModelConfig.from_preset("llama2-7b", n_layers=args.layers) if dev.type == "cuda" else \
        ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1408, max_seq_len=64)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = {}
    for kind in ("dense", "pesc"):
        torch.manual_seed(0)
        with torch.device(dev):
            net = Transformer(config)
        if kind == "pesc":
            moe.upcycle(net, PESCConfig(num_experts=8, top_k=2, adapter_dim=64, adapter_dropout=0.0))
            for ff in moe.pesc_layers(net):
                torch.nn.init.normal_(ff.adapter_up, 0, 0.02)  # zero at upcycling, not after training
        net, prompt, stamps = net.to(dtype).eval(), torch.randint(0, config.vocab_size, (1, 16), device=dev), []
        generate(net, prompt, 4, temperature=0)  # warm-up: allocator, kernels, caches
        generate(net, prompt, 48, temperature=0, on_token=lambda ids: sync() or stamps.append(time.perf_counter()))
        results[kind] = (len(stamps) - 2) / (stamps[-1] - stamps[1])
        print(f"[decode] {kind:5s} dim {config.dim} x {config.n_layers} layers, {str(dtype)[6:]} {dev}: "
              f"{results[kind]:.1f} tokens/s")
    print(f"[decode] PESC / dense: {results['pesc'] / results['dense']:.2f}")
    return results


# -----------------------------------------------------------------------------
# Training: train.py's own step, per --mode


def training_run(mode, device, layers, quantize="", compile=False):
    """A train.Run of mode (pesc, pesc+lora, lora, full) built by train.py's own functions from a
    random base checkpoint; its data: one random batch of rows packed with 4 documents each. CPU: preset 'small', E=8 top-2 r=64, LoRA r=16,
    8 x 256 tokens, fp32. GPU: Llama-2-7B's first `layers` layers, Camelidae's settings, LoRA 64,
    4 x 1024 tokens, bf16. quantize="nf4": the base linears in NF4 (QLoRA)."""
    cuda = cli.resolve_device(device).type == "cuda"
    cfg = ModelConfig.from_preset("llama2-7b", n_layers=layers) if cuda else ModelConfig.from_preset("small")
    B, T = (4, 1024) if cuda else (8, 256)
    kind, _, lora = mode.partition("+")
    ckpt = tempfile.mkdtemp(prefix="bench-base-")  # a random base, loaded by train.py's own code
    options = ["--ckpt", ckpt, "--mode", kind, "--num_experts", "8", "--experts_per_token", "2", "--adapter_dim", "512" if cuda else "64",
               "--lora_rank", ("64" if cuda else "16") if kind == "lora" or lora else "0", "--batch_size", str(B),
               "--grad_accum_steps", "1", "--seq_len", str(T), "--lr", "1e-5", "--device", device, "--quantize",
               quantize, "--compile", str(compile)]
    args, _ = train.parse_args(options)
    where = train.Dist.one_process(args.device)
    dtype = cli.resolve_dtype(args.dtype, where.device)
    torch.manual_seed(0)
    try:
        Transformer(cfg).to(dtype).save_pretrained(ckpt)
        net = train.prepare_model(train.load_model(args, where, dtype)[0], args, where, dtype, log=lambda *a: None)
    finally:
        shutil.rmtree(ckpt)
    optimizer, params = train.make_optimizer(net, args, where)
    batch = (torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T)),
             attention_inputs((torch.arange(T) // (T // 4)).expand(B, T)))
    data = SimpleNamespace(train_batch=lambda start, batch_size: batch)  # what train_step reads of the data
    run = train.Run(args, where, print, net, net, optimizer, params, data, dtype)
    train.finish(run)
    return run


def train_step_in_process(mode, device, layers, quantize=""):
    """One row of bench_train, in its own process: tokens/s, MFU (GPU), peak memory, sizes."""
    idle = peak_rss_mib()
    run = training_run(mode, device, layers, quantize)
    (dt,) = race([lambda: train.train_step(run, 1e-5)], warmup=2, iters=5, device=run.dist.device)
    B, T = run.args.batch_size, run.args.seq_len
    r = dict(tokens_per_s=B * T / dt, B=B, T=T, trainable=run.raw_model.num_params(True), total=run.raw_model.num_params())
    peak = peak_flops(run.dist.device, run.dtype)
    if peak is not None:
        r.update(mfu=run.raw_model.estimate_mfu(B * T / dt, T, peak), peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    else:
        r.update(peak_mib=peak_rss_mib(), above_idle_mib=peak_rss_mib() - idle)
    return r


def bench_train(args):
    """train.train_step per --mode (pesc, pesc+lora, lora, full), each in a fresh process: tokens/s,
    MFU on a GPU, peak memory (the CUDA allocator's; on CPU the resident set, and above idle)."""
    results = {}
    for mode in ("pesc", "pesc+lora", "lora", "full"):
        r = results[mode] = in_fresh_process(train_step_in_process, mode, args.device, args.layers)
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        mem = f"peak {r['peak_mib']:.0f} MiB" + (f" (+{r['above_idle_mib']:.0f} above idle)" if "above_idle_mib" in r else "")
        print(f"[train] {mode:9s} B={r['B']} T={r['T']}: {r['tokens_per_s']:8.0f} tokens/s{mfu}, {mem}, "
              f"trainable {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.1f}M")
    return results


# -----------------------------------------------------------------------------
# LoRA: the fused linears vs their plain twin vs transformers + PEFT (CPU)


def bench_lora(args):
    """Forward + backward, base frozen, LoRA r=64 alpha 16 on all seven linears: one LoRA linear
    (d 1024 -> 2816, 2048 rows) fused vs its plain twin, then a 2-layer LLaMA (d 1024, ffn 2816,
    vocab 32000, 4 x 512 tokens, fp32) of this project vs transformers + PEFT (optional, loaded by
    name: no project code depends on them)."""
    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=2, n_heads=16, ffn_dim=2816, max_seq_len=512)
    torch.manual_seed(0)
    layer = moe.LoRALinear(torch.nn.Linear(1024, 2816, bias=False).requires_grad_(False), 64, 16.0, 0.0)
    x = torch.randn(2048, 1024, requires_grad=True)
    linear = {name: lambda fn=fn: fn(x, x, layer.weight, None, layer.lora_a, layer.lora_b, layer.scale).sum().backward()
              for name, fn in (("fused", moe.lora_linear), ("plain", moe.lora_linear_plain))}
    net = moe.add_lora(Transformer(cfg).requires_grad_(False), moe.LoRAConfig(rank=64, dropout=0.0))
    idx = torch.randint(0, cfg.vocab_size, (4, 512))
    steps = {"project": lambda: net(idx, idx)[1].backward()}
    try:
        peft, transformers = (__import__(name) for name in ("peft", "transformers"))
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, max_position_embeddings=512, attn_implementation="sdpa"))
        targets = [hf_name.split(".")[1] for _, hf_name in moe.LINEARS.values()]
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        steps["peft"] = lambda: hf(input_ids=idx, labels=idx).loss.backward()
    except ImportError as e:
        print(f"[lora] transformers + PEFT not installed ({e.name}): this project only")
    res = {f"{what}_{name}_ms": 1e3 * t for what, fns in (("linear", linear), ("model", steps))
           for name, t in zip(fns, race(list(fns.values()), warmup=1, iters=getattr(args, "iters", 5)))}
    print("[lora] " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()) + f" ({torch.get_num_threads()} threads)")
    return res


# -----------------------------------------------------------------------------
# Triton kernels vs their PyTorch twins (GPU)


def bench_kernels(args):
    """Each Triton kernel vs its PyTorch twin, forward + backward, bf16, at Llama-2-7B / Camelidae
    sizes (8192 tokens). Both sides are model.py's and moe.py's own code; PESC_KERNELS picks."""
    if cli.resolve_device(args.device).type != "cuda" or kernels.triton is None:
        print("[kernels] skipped: the Triton kernels are timed on a GPU (--device cuda) with Triton")
        return {}
    N, D, F_, E, r, V, H, hd = 8192, 4096, 11008, 8, 512, 32000, 32, 128
    torch.manual_seed(0)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, device="cuda") * s).bfloat16().requires_grad_()  # noqa: E731
    x, res, a, b, qkv = rand(N, D), rand(N, D), rand(N, F_), rand(N, F_), rand(16, N // 16, 3 * H * hd)
    angles = torch.arange(N // 16, device="cuda")[:, None] * 1e4 ** (-torch.arange(0, hd, 2, device="cuda") / hd)
    head, targets = rand(V, D, s=0.02).detach(), torch.randint(0, V, (N,), device="cuda")
    (w, e), down, up = moe.route(torch.randn(N, E, device="cuda"), 2), rand(E, r, D, s=D ** -0.5), rand(E, D, r, s=0.02)
    norm = model.RMSNorm(D, 1e-5).to("cuda", torch.bfloat16).requires_grad_(False)
    cases = {"rms_norm + residual": lambda: sum(t.sum() for t in norm(x, res)),
             "swiglu": lambda: model.swiglu(a, b).sum(),
             "apply_rope": lambda: model.apply_rope(qkv.view(16, -1, 3 * H, hd)[:, :, :H], angles.cos()[None],
                                                    angles.sin()[None]).sum(),
             "LM head + loss": lambda: (kernels.linear_cross_entropy(x, head, targets) if kernels.use_triton(x)
                                        else model.cross_entropy(F.linear(x, head), targets)),
             "adapter_experts": lambda: moe.adapter_experts(x, w, e, down, up, 0.25, 0.1, True).sum()}
    results = {}
    for name, fn in cases.items():
        ms = []
        for mode in ("triton", "torch"):
            with kernel_mode(mode):
                ms.append(1e3 * race([lambda: fn().backward()], device="cuda")[0])
        results[name] = dict(triton_ms=ms[0], twin_ms=ms[1])
        print(f"[kernels] {name:20s} triton {ms[0]:8.2f} ms, twin {ms[1]:8.2f} ms ({ms[1] / ms[0]:.2f}x)")
    return results


# -----------------------------------------------------------------------------
# NF4 / QLoRA


def bench_quant(args):
    """Bytes per base parameter, dequantize throughput (the twin; on CUDA also the kernel) on a
    Llama-2-7B FFN weight, and train.py's QLoRA step against the same step unquantized."""
    dev = str(cli.resolve_device(args.device))
    w = torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16) * 0.02
    packed = quant.quantize_nf4(w)
    print(f"[quant] 11008x4096 weight: {packed.nbytes() / packed.numel():.4f} bytes/param in NF4 (double-quantized "
          f"absmax), {8 * packed.nbytes() / packed.numel():.3f} bits")
    fns = {"twin": lambda: quant.dequantize_torch(packed, torch.bfloat16)}
    if dev.startswith("cuda"):
        fns["kernel"] = lambda: quant.dequantize_nf4(packed, torch.bfloat16)
    for name, t in zip(fns, race(list(fns.values()), warmup=1, iters=5, device=dev)):
        print(f"[quant] dequantize ({name}) -> bf16: {t * 1e3:.1f} ms, {packed.numel() / t / 1e6:,.0f} Mparam/s")
    runs = [training_run("pesc+lora", dev, args.layers, quantize) for quantize in ("", "nf4")]
    times = race([lambda r=r: train.train_step(r, 1e-5) for r in runs], warmup=2, iters=5, device=dev)
    print(f"[quant] train step pesc+lora {1e3 * times[0]:.1f} ms, QLoRA (NF4 base) {1e3 * times[1]:.1f} ms: "
          f"{times[1] / times[0]:.2f}x")
    return dict(bytes_per_param=packed.nbytes() / packed.numel(), step_ms=1e3 * times[0], qlora_step_ms=1e3 * times[1])


# -----------------------------------------------------------------------------
# The data pipeline at real size: tokenizing into the token cache, a second start

WORDS = ("the of and to in is that for it as with was on be by this are or at from have an which not but what all "
         "were when we there can your more one has their if will each about how up out them then she many some so "
         "answer question explain step because therefore result function value list return print code python "
         "error total sum equation solve given area triangle circle river city history science").split()


def write_sharegpt(path, n, seed=0):
    """n generated conversations shaped like SlimOrca's: a system prompt in half of them, 1-3
    turns, short questions and longer answers of common English words."""
    import random

    rng, say = random.Random(seed), lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))
    lines = []
    for _ in range(n):
        turns = [{"from": "system", "value": say(8, 30)}] if rng.random() < 0.5 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            turns += [{"from": "human", "value": say(10, 80) + "?"}, {"from": "gpt", "value": say(20, 250) + "."}]
        lines.append(json.dumps({"conversations": turns}) + "\n")
    write_atomic(path, "".join(lines))


def data_in_process(spec, tokenizer_dir, cache_dir, seq_len, workers):
    """InstructionData built (or found) in the token cache: seconds, sizes, peak memory."""
    from data import InstructionData
    from tokenizer import Tokenizer

    idle, t0 = peak_rss_mib(), time.perf_counter()
    data = InstructionData(spec, Tokenizer(tokenizer_dir), seq_len, pack_rows=True, val_fraction=0.01, seed=0,
                           cache_dir=cache_dir, workers=workers, log=lambda line: None)
    return dict(seconds=time.perf_counter() - t0, records=sum(s["records"] for s in data.sources),
                tokens=sum(s["tokens"] for s in data.sources), rows=len(data.train_rows), peak_mib=peak_rss_mib(),
                idle_mib=idle)


def bench_data(args):
    """First start (tokenizing into the token cache) with 1 and 2 workers on a generated ShareGPT
    file (and 2 workers on a quarter of it: memory does not follow the dataset), then a second
    start, which maps the cache; each in a fresh process."""
    from importlib.util import find_spec

    from tokenizer import write_byte_tokenizer

    root, n = os.path.abspath(os.path.join("out", "bench-data")), args.conversations
    tok_dir, cache = os.path.join(root, "tokenizer"), os.path.join(root, "cache")
    os.makedirs(tok_dir, exist_ok=True)
    spec = find_spec("llama_models")  # Meta's Llama 3 tokenizer ships in it; else the byte-level one
    meta = os.path.join(os.path.dirname(spec.origin), "llama3", "tokenizer.model") if spec else ""
    if os.path.isfile(meta):
        shutil.copyfile(meta, os.path.join(tok_dir, "tokenizer.model"))
    else:
        write_byte_tokenizer(os.path.join(tok_dir, "tokenizer.model"))
    files = {c: os.path.join(root, f"sharegpt-{c}.jsonl") for c in (n // 4, n)}
    for count, path in files.items():
        if not os.path.isfile(path):
            write_sharegpt(path, count)
    for count, workers, fresh in ((n // 4, 2, True), (n, 1, True), (n, 2, True), (n, 2, False)):
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        r = in_fresh_process(data_in_process, files[count], tok_dir, cache, args.seq_len, workers)
        print(f"[data] {'first' if fresh else 'second'} start, {count:,} conversations, {workers} worker(s): "
              f"{r['seconds']:.2f} s, {r['tokens'] / 1e6:.1f}M tokens ({r['tokens'] / r['seconds'] / 1e6:.2f}M/s), "
              f"{r['rows']:,} rows, peak RSS {r['peak_mib']:.0f} MiB (idle {r['idle_mib']:.0f})")


# -----------------------------------------------------------------------------
# Serving with vLLM (serve/): run with the serve venv's python (README: Serving)


def bench_serve(args, steps=64, dim=1024, layers=8):
    """Generated tokens/s of vLLM's OpenAI server (the serve/ plugin) at 1, 8 and 32 concurrent
    greedy requests of exactly `steps` tokens, PESC (8 experts, top-2, adapter dim dim/8, as
    Camelidae's 512 of 4096) beside the same dense base, and sample.generate at batch 1 and 32;
    fp32, eager, random weights, the byte-level tokenizer."""
    import concurrent.futures
    import socket
    import urllib.request

    from openai import OpenAI

    from convert import export_hf
    from tokenizer import write_byte_tokenizer

    root, results = tempfile.mkdtemp(prefix="bench-serve-"), {}
    prompts = [[256] + [(7 * i + j) % 256 for j in range(24)] for i in range(32)]  # BOS + 24 bytes, all different
    for kind in ("dense", "pesc"):
        torch.manual_seed(0)
        net = Transformer(ModelConfig(vocab_size=512, dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 128,
                                      ffn_dim=int(dim * 2.75), max_seq_len=256))
        if kind == "pesc":
            moe.upcycle(net, PESCConfig(num_experts=8, top_k=2, adapter_dim=dim // 8, adapter_dropout=0.0))
            for ff in moe.pesc_layers(net):
                torch.nn.init.normal_(ff.adapter_up, std=0.02)  # zero at upcycling, not after training
        ckpt, hf = os.path.join(root, kind), os.path.join(root, kind + "-hf")
        net.eval().save_pretrained(ckpt)
        write_byte_tokenizer(os.path.join(ckpt, "tokenizer.model"))
        export_hf(ckpt, hf)
        r = results[kind] = {f"generate_{b}": b * steps / race([lambda: generate(net, prompts[:b], steps, temperature=0)],
                                                                1, 2)[0] for b in (1, 32)}
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf, "--port",
                                   str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager"],
                                  stdout=open(os.path.join(root, kind + ".log"), "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True, env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ})  # GiB
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None, f"the vLLM server failed; see {root}/{kind}.log"
                    time.sleep(1)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)

            def requests(n):  # n greedy completions at once, each exactly `steps` tokens
                with concurrent.futures.ThreadPoolExecutor(n) as pool:
                    counts = list(pool.map(lambda p: client.completions.create(
                        model=hf, prompt=p, max_tokens=steps, temperature=0,
                        extra_body={"ignore_eos": True}).usage.completion_tokens, prompts[:n]))
                assert counts == [steps] * n, counts

            r.update({f"vllm_{n}": n * steps / race([lambda: requests(n)], 1, 3)[0] for n in (1, 8, 32)})
        finally:
            os.killpg(server.pid, 15)
            server.wait()
        print(f"[serve] {kind:5s} tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    return results


# -----------------------------------------------------------------------------
# bench.py --gpu --out_dir DIR: the first check on a machine with one GPU


def gpu_check(args, sections=("kernels", "train", "decode"), tests=True):
    """The GPU tests (kernels, model, converter parity; Triton compiled, not interpreted), then the
    sections on cuda, each isolated (a failure is recorded, the rest runs); out_dir/gpu_check.json
    is rewritten after each, so a run stopped from outside leaves what finished."""
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "triton": getattr(kernels.triton, "__version__", None)}
    path = os.path.join(args.out_dir, "gpu_check.json")
    if tests:
        env = dict(os.environ, TRITON_INTERPRET="0", PESC_TEST_DEVICE="cuda")
        cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_model.py",
               "tests/test_convert.py::test_converted_pesc_in_bf16_on_the_device"]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.test_timeout_s,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
            results["tests"] = {"passed": p.returncode == 0, "tail": (p.stdout + p.stderr).strip().splitlines()[-30:]}
        except subprocess.TimeoutExpired:
            results["tests"] = {"passed": False, "tail": [f"pytest ran past {args.test_timeout_s} s"]}
        write_json(path, results)
    for name in sections:
        try:
            results[name] = SECTIONS[name](args)
        except Exception as e:  # reported, and the next section runs
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        write_json(path, results)
    return results


SECTIONS = {"moe": bench_moe, "decode": bench_decode, "train": bench_train, "lora": bench_lora,
            "kernels": bench_kernels, "quant": bench_quant, "data": bench_data, "serve": bench_serve}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--only", default=",".join(QUICK), help=f"comma-separated sections, or all (but serve): {', '.join(SECTIONS)}")
    cli.add_device_dtype(p)
    p.add_argument("--layers", type=int, default=4, help="GPU: Llama-2-7B's first N layers (train, decode, quant)")
    p.add_argument("--gpu", default=False, **cli.FLAG, help="the prepared check for a 1-GPU machine (with --out_dir)")
    p.add_argument("--out_dir", default=None, help="--gpu: where gpu_check.json goes")
    p.add_argument("--test_timeout_s", type=int, default=240, help="--gpu: for the GPU tests")
    p.add_argument("--conversations", type=int, default=200_000, help="size of the generated set in 'data'")
    p.add_argument("--seq_len", type=int, default=2048, help="rows of the 'data' section")
    args = cli.parse(p, argv, {"--out": "--out_dir"})
    if args.gpu:
        if args.out_dir is None:
            p.error("--gpu needs --out_dir DIR")
        if not torch.cuda.is_available():
            raise SystemExit("bench.py --gpu: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), "
                             "so there is nothing to check; run it on the GPU machine")
        return gpu_check(args)
    names = [n for n in SECTIONS if n != "serve"] if args.only == "all" else args.only.split(",")
    for name in names:
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, device {cli.resolve_device(args.device)}, {torch.get_num_threads()} CPU threads")
    return {name: SECTIONS[name](args) for name in names}


if __name__ == "__main__":
    main()
