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
from model import FeedForward
from moe import PESCConfig, PESCFeedForward


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

SECTIONS = {"moe": bench_moe}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for name in args.only.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads")
    for name in args.only.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
