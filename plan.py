"""
The memory plan of a training run, per GPU, before renting any: `python train.py --plan`.

Weights, gradients and AdamW states are counted from the tensors of the model train.py builds
(on the meta device, so a 70B plan takes seconds), sharded as FSDP2 shards them: each tensor
split on its first dimension into world_size equal parts, the last padded. Activations are what
autograd saves for the backward pass, counted by running the model's forward on meta tensors
(PyTorch paths, no Triton kernels; the adapters' sorted path runs on meta tensors too): the
tensors saved inside each block, outside the blocks, and for the LM head and loss. With activation checkpointing a block keeps only its input until the
backward pass recomputes it, one block at a time. Checked against a CPU forward's saved tensors
(tests/test_plan.py): +5% on a tiny PESC model with packed rows, an overestimate because the meta
trace takes SDPA's math path (the attention weights saved) where CPU and GPU take fused kernels.
On a GPU the Triton kernels save less than the PyTorch paths counted here (unmeasured: no GPU).
"""

import json
import math
import os

import torch

import cli
import moe
import quant
from model import PRESETS, QUANTIZED_KEY, ModelConfig, Transformer

GIB = 2**30


def shard_numel(shape, world):
    """Elements one rank holds of a tensor FSDP2 shards over `world` ranks (the largest shard)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def unique_params(model):
    return list({id(p): p for p in model.parameters()}.values())  # a tied weight counts once


def state_bytes(model, world, fsdp, compute_dtype, grad_accum_steps, quantize=None):
    """Bytes per GPU of the frozen weights (compute dtype; with quantize="nf4" the seven base
    linears of every block in NF4, sharded under FSDP as quant.NF4Linear.flatten_ lays them out),
    the trainable fp32 master weights, their fp32 gradients and AdamW's two fp32 moments plus its
    step counter per tensor."""
    each = (lambda p: shard_numel(p.shape, world)) if fsdp else (lambda p: p.numel())
    params = unique_params(model)
    trainable = [p for p in params if p.requires_grad]
    nf4 = {id(p) for n, p in model.named_parameters() if quantize and QUANTIZED_KEY.fullmatch(n)}
    storage = quant.NF4Linear.storage_dtype(compute_dtype).itemsize  # as train.shard_model flattens it

    def frozen_bytes(p):
        if id(p) not in nf4:
            return each(p) * compute_dtype.itemsize
        if not fsdp:
            return quant.packed_nbytes(p.shape)
        return shard_numel((quant.packed_nbytes(p.shape, aligned=True) // storage,), world) * storage

    frozen = sum(frozen_bytes(p) for p in params if not p.requires_grad)
    master = sum(each(p) for p in trainable) * 4
    out = {"frozen_weights": frozen, "trainable_weights": master, "gradients": master,
           "adamw_states": 2 * master + 4 * len(trainable)}
    if fsdp and grad_accum_steps > 1:
        # between micro-steps FSDP2 keeps the unreduced gradient whole (no reduce-scatter yet)
        out["unsharded_gradients"] = sum(p.numel() for p in trainable) * 4
    if not fsdp and world > 1:
        out["ddp_buckets"] = sum(p.numel() for p in trainable) * 4  # DDP's all-reduce buckets: a copy
    return out


def saved_activations(model, batch, seq_len, packed=True):
    """Bytes autograd saves in one forward of (batch, seq_len) tokens, traced on the meta device:
    {"blocks": [per block], "outside": embeddings and the last norm, "logits_loss": LM head and
    loss}. Each saved tensor counts once (views count as their base); parameters do not count."""
    params = {id(p) for p in model.parameters()}
    seen, where = {}, [None]
    sums = {"blocks": [0] * len(model.layers), "outside": 0, "logits_loss": 0}
    vocab = model.config.vocab_size

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or id(base) in seen:
            return t
        seen[id(base)] = base  # kept alive, so that its id is not reused
        nbytes = base.numel() * base.element_size()
        if base.dim() and base.shape[-1] == vocab:
            sums["logits_loss"] += nbytes
        elif where[0] is None:
            sums["outside"] += nbytes
        else:
            sums["blocks"][where[0]] += nbytes
        return t

    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    try:
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            idx = torch.zeros(batch, seq_len, dtype=torch.long)
            kw = {"valid": torch.ones(batch, seq_len, dtype=torch.bool)}
            if packed:  # train.py packs several examples per row: the model builds a (B, T, T) mask
                kw["doc_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
                kw["positions"] = torch.zeros(batch, seq_len, dtype=torch.long)
            model(idx, idx, **kw)
    finally:
        for h in hooks:
            h.remove()
    return sums


def activation_bytes(model, batch, seq_len, packed=True):
    """(without checkpointing, with checkpointing, the LM head and loss) for a micro-batch."""
    s = saved_activations(model, batch, seq_len, packed)
    block_input = batch * seq_len * model.config.dim * model.tok_embeddings.weight.dtype.itemsize
    plain = sum(s["blocks"]) + s["outside"]
    # checkpointed: every block's input, plus one block's saved tensors while it is recomputed
    ckpt = len(model.layers) * block_input + max(s["blocks"], default=0) + s["outside"]
    return plain, ckpt, s["logits_loss"]


def memory_plan(model, *, world, fsdp, batch, seq_len, grad_accum_steps, grad_checkpointing, compute_dtype,
                gpu_mem_gb=None, packed=True, quantize=None):
    """Every term per GPU in bytes, the parameter counts, and the largest micro-batch that fits."""
    plan = {"parameters": {"total": model.num_params(), "trainable": model.num_params(trainable_only=True)},
            "world_size": world, "fsdp": fsdp, "batch_size": batch, "seq_len": seq_len,
            "grad_checkpointing": grad_checkpointing, "quantize": quantize}
    terms = state_bytes(model, world, fsdp, compute_dtype, grad_accum_steps, quantize)
    plain, ckpt, logits = activation_bytes(model, batch, seq_len, packed)
    terms["activations_without_checkpointing"] = plain
    terms["activations_with_checkpointing"] = ckpt
    terms["logits_loss"] = logits
    fixed = sum(v for k, v in terms.items() if not k.startswith(("activations", "logits")))
    per_batch = (ckpt if grad_checkpointing else plain) + logits
    terms["total"] = fixed + per_batch
    plan["bytes_per_gpu"] = terms
    if gpu_mem_gb is not None:
        # activations and logits grow with the rows of a micro-batch, the rest does not
        per_row = per_batch / batch
        plan["gpu_mem_gb"] = gpu_mem_gb
        plan["max_batch_size"] = max(0, int((gpu_mem_gb * GIB - fixed) // per_row))
    return plan


def format_plan(plan) -> str:
    p, t = plan["parameters"], plan["bytes_per_gpu"]
    how = "FSDP" if plan["fsdp"] else ("DDP" if plan["world_size"] > 1 else "one GPU")
    how += ", NF4 base" if plan.get("quantize") == "nf4" else ""
    lines = [f"parameters: total {p['total']:,}, trainable {p['trainable']:,} "
             f"({100 * p['trainable'] / max(p['total'], 1):.2f}%)",
             f"per GPU ({how}, {plan['world_size']} GPU{'s' if plan['world_size'] > 1 else ''}), micro-batch "
             f"{plan['batch_size']} x {plan['seq_len']} tokens:"]
    for k, v in t.items():
        used = k != ("activations_without_checkpointing" if plan["grad_checkpointing"] else
                     "activations_with_checkpointing")
        lines.append(f"  {k.replace('_', ' '):36s} {v / GIB:9.2f} GiB" + ("" if used or k == "total" else "  (not used)"))
    if "max_batch_size" in plan:
        lines.append(f"largest micro-batch in {plan['gpu_mem_gb']:g} GiB: {plan['max_batch_size']} "
                     f"(no CUDA context or allocator slack counted)")
    return "\n".join(lines)



def print_plan(args, pesc, lora):
    """train.py --plan: build the run's model on the meta device (no weights read) and print its
    memory per GPU (args: train.py's options; pesc, lora: the configs they ask for)."""
    if args.world_size < 1:
        raise SystemExit(f"train.py --plan: --world_size must be at least 1, got {args.world_size}")
    cfg_file = os.path.join(args.ckpt, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = ModelConfig.from_dict(json.load(f), cfg_file)
    elif args.ckpt in PRESETS:
        config = ModelConfig.from_preset(args.ckpt)
    else:
        raise SystemExit(f"train.py --plan: --ckpt {args.ckpt!r} is neither a checkpoint directory "
                         f"(no config.json) nor a preset ({', '.join(PRESETS)})")
    dtype = cli.resolve_dtype(args.dtype, "cuda")  # the plan is for GPUs
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = moe.make_trainable(Transformer(config), args.mode, pesc, lora)
    moe.cast_for_training(model, dtype)
    result = memory_plan(model, world=args.world_size, fsdp=args.fsdp, batch=args.batch_size, seq_len=args.seq_len,
                         grad_accum_steps=args.grad_accum_steps, grad_checkpointing=args.grad_checkpointing,
                         compute_dtype=dtype, gpu_mem_gb=args.gpu_mem_gb, packed=args.pack,
                         quantize=args.quantize or None)
    print(json.dumps(result) if args.json else format_plan(result))
    return result
