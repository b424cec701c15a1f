"""
Benchmarks. Each section warms up, then times; numbers go to BENCHMARKS.md by hand, with the
machine, the date and the command.

    python bench.py                      # every section that fits the device
    python bench.py --only moe           # one PESC layer vs the dense FFN (CPU, issue 3 sizes)
    python bench.py --only decode,train  # generation and training throughput
    python bench.py --only kernels --device cuda   # Triton kernels vs their twins (GPU)
"""

import argparse
import time

import torch
import torch.nn.functional as F

import moe
from model import FeedForward, ModelConfig, Transformer
from moe import PESCConfig, PESCFeedForward, pesc_layers, upcycle
from sample import DTYPES, generate


def timeit(fn, warmup=2, iters=5, device="cpu"):
    """Median seconds of fn() after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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

    t_dense = timeit(dense_step, device=dev)
    t_pesc = timeit(pesc_step, device=dev)
    t_fast = timeit(moe_part(moe.adapter_experts_sorted), device=dev)
    t_loop = timeit(moe_part(moe.adapter_experts_loop), device=dev)
    t_mask = timeit(moe_part(adapter_experts_dense), device=dev)
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

SECTIONS = {"moe": bench_moe, "decode": bench_decode}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
