"""
Instruction-tune a LLaMA-family checkpoint into a PESC model (or a dense LoRA / full baseline).

    python train.py                                          # the built-in CPU demo (below)
    python train.py --init_from CKPT --data DATA.json --out_dir out/run
    torchrun --standalone --nproc_per_node=8 train.py --init_from CKPT --data DATA.json

A dense --init_from is upcycled (moe.upcycle) with the PESC options; a PESC one keeps its
experts and trains on. Only trainable tensors go to AdamW. --batch_size and --grad_accum_steps
are per rank: one optimizer step sees batch_size * grad_accum_steps * world_size rows.

out_dir ends up holding a standalone project checkpoint (config.json, model.safetensors, the
tokenizer; LoRA merged) that sample.py and convert.py read, metrics.jsonl, and train_state/
(the trainable tensors, optimizer, RNG states, data position, options, base fingerprint) that
--resume continues from exactly.
"""

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import moe
import quant
from data import IGNORE_INDEX, InstructionData, data_hash
from model import FLAG, Transformer, checkpoint_files, peak_flops, replace_dir, write_checkpoint
from tokenizer import Tokenizer, tokenizer_files, write_tokenizer_config

# -----------------------------------------------------------------------------
# Options


def build_parser():
    # Defaults follow the official PESC recipe (the paper's training script) where it has one.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init_from", default="", help="project checkpoint to start from (dense or PESC)")
    p.add_argument("--data", default="", help="a data file (.json, .jsonl, .jsonl.gz, .parquet; chat, ShareGPT, "
                   "Alpaca, prompt/response or PESC records) or a mixture a.parquet:0.5,b.jsonl:0.5 (weights: "
                   "shares of the training rows; bare paths a,b: every row of each)")
    p.add_argument("--out_dir", default="out/pesc")
    p.add_argument("--mode", default="pesc", choices=["pesc", "lora", "full"],
                   help="pesc: routers + adapters (+ LoRA); lora, full: the dense baselines")
    g = p.add_argument_group("PESC (used when upcycling a dense checkpoint)")
    g.add_argument("--num_experts", type=int, default=8)
    g.add_argument("--top_k", type=int, default=2)
    g.add_argument("--adapter_dim", type=int, default=512)
    g.add_argument("--adapter_scaling", type=float, default=0.25)
    g.add_argument("--adapter_dropout", type=float, default=0.1)
    g.add_argument("--aux_loss_coef", type=float, default=0.01)
    g.add_argument("--z_loss_coef", type=float, default=0.0)
    g = p.add_argument_group("LoRA on the base linears (pesc: 0 turns it off; lora: required)")
    g.add_argument("--lora_rank", type=int, default=64)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--lora_targets", default="q,k,v,o,gate,up,down")
    g = p.add_argument_group("data")
    g.add_argument("--template", default="", help="chat template; default: the checkpoint tokenizer's")
    g.add_argument("--seq_len", type=int, default=512)
    g.add_argument("--pack", default=True, **FLAG, help="pack several examples per row (--pack false: one per row)")
    g.add_argument("--val_fraction", type=float, default=0.01, help="share of examples held out")
    g.add_argument("--fields", default="", type=field_names, help="PROMPT_KEY,RESPONSE_KEY of prompt/response records "
                   "whose keys are ambiguous or uncommon")
    g.add_argument("--cache_dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                       "pesc", "data"), help="where the token cache lives")
    g.add_argument("--rebuild_cache", default=False, **FLAG, help="tokenize again even if the cache has the data")
    g.add_argument("--data_workers", type=int, default=0, help="processes tokenizing a new dataset; 0: one per core")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=1, help="rows per micro-batch, per rank")
    g.add_argument("--grad_accum_steps", type=int, default=16, help="micro-batches per step, per rank")
    g.add_argument("--max_iters", type=int, default=0, help="optimizer steps; 0: --epochs decides")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--min_lr", type=float, default=0.0, help="end of the cosine schedule")
    g.add_argument("--warmup_iters", type=int, default=200)
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"])
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--grad_clip", type=float, default=0.3, help="max grad norm; 0: no clipping")
    g = p.add_argument_group("run")
    g.add_argument("--eval_interval", type=int, default=200)
    g.add_argument("--save_interval", type=int, default=500, help="0: save at the end only")
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (autocast) and storage of frozen weights; auto: bf16 on GPU (float16 "
                        "would need loss scaling, which this loop does not do; GPUs without bf16: float32)")
    g.add_argument("--quantize", default="", choices=["", "nf4"],
                   help="nf4: QLoRA, the frozen base linears in 4-bit NF4 (quant.py), as the official recipe")
    g.add_argument("--compile", default=False, **FLAG, help="torch.compile each transformer block (regional)")
    g.add_argument("--grad_checkpointing", default=False, **FLAG)
    g.add_argument("--resume", default=False, **FLAG, help="continue from out_dir/train_state")
    g = p.add_argument_group("memory plan (prints, trains nothing)")
    g.add_argument("--plan", default=False, **FLAG, help="print the memory per GPU of this run and exit")
    g.add_argument("--world_size", type=int, default=1, help="--plan: GPUs of the run")
    g.add_argument("--gpu_mem_gb", type=float, default=None, help="--plan: GiB per GPU, for the largest micro-batch")
    g.add_argument("--json", default=False, **FLAG, help="--plan: one JSON object (bytes per GPU)")
    g.add_argument("--fsdp", default=False, **FLAG,
                   help="shard the model, gradients and optimizer over the ranks (FSDP2; under torchrun), "
                        "for bases that do not fit one GPU beside their activations; default DDP")
    return p


def field_names(s):
    names = tuple(n.strip() for n in s.split(",")) if s else ()
    if s and (len(names) != 2 or not all(names)):
        raise argparse.ArgumentTypeError(f"expected PROMPT_KEY,RESPONSE_KEY, got {s!r}")
    return ",".join(names)


_UNSET = object()


def parse_args(argv):
    """(options, names of the options given on the command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.set_defaults(**{k: _UNSET for k in vars(args)})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET}
    return args, given


# Options that may differ when resuming: they do not change what is computed step by step.
# grad_accum_steps may change with the world size as long as the rows per step stay the same
# (checked in restore): dropout masks are keyed to the data position, not to the rank.
RESUME_MAY_CHANGE = {"max_iters", "epochs", "eval_interval", "save_interval", "log_interval", "device",
                     "compile", "grad_checkpointing", "resume", "out_dir", "init_from", "data",
                     "grad_accum_steps", "cache_dir", "rebuild_cache", "data_workers",
                     "fsdp", "plan", "world_size", "gpu_mem_gb", "json"}


# -----------------------------------------------------------------------------
# Helpers


def fingerprint(ckpt_dir):
    """A hash of a checkpoint: config.json, each safetensors header, and 16 slices of 64 KiB
    spread over each file. Cheap for a 70B model, and two fine-tunes of one architecture
    (same headers) still differ in the sampled bytes."""
    h = hashlib.sha256()
    with open(os.path.join(ckpt_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for fname in checkpoint_files(ckpt_dir):
        size = os.path.getsize(fname)
        h.update(f"{os.path.basename(fname)}:{size}".encode())
        with open(fname, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # safetensors: header length, then the JSON header
            h.update(f.read(n))
            for i in range(16):
                f.seek((size - 65536) * i // 15 if size > 65536 else 0)
                h.update(f.read(65536))
    return h.hexdigest()


def get_lr(it, total, args):
    """Linear warmup to --lr, then constant or cosine down to --min_lr at the last step."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if args.lr_schedule == "constant":
        return args.lr
    progress = (it - args.warmup_iters) / max(1, total - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - args.min_lr)


def check_quantize(args):
    if args.quantize and args.mode == "full":
        raise ValueError(f"--quantize {args.quantize} freezes the base linears; --mode full would train them")


def setup_model(args, device, ptdtype, log, sharded=False, quantize_on=None):
    """Load --init_from and make it a PESC / LoRA / fully trainable model per --mode.

    sharded: the base stays memory-mapped in its file dtype (new tensors are made in that dtype),
    for shard_model to cast and shard block by block. quantize_on: the device that quantizes an
    NF4 base (the run's; the packed weights then live on `device`)."""
    check_quantize(args)
    # NF4 quantizes as the tensors stream in: the full-precision base is never resident. FSDP loads
    # into CPU memory (shard_model moves each block's shards to the GPU); the GPU still quantizes.
    model = Transformer.from_pretrained(args.init_from, device=device, quantize=args.quantize or None, mmap=sharded,
                                        quantize_on=quantize_on)
    file_dtype = model.tok_embeddings.weight.dtype  # the export keeps the base's dtype
    if not sharded:
        for p in model.parameters():  # parameters only: the RoPE buffer stays fp32
            p.data = p.data.to(ptdtype)
    make_trainable(model, args, log)
    if sharded:
        return model, file_dtype
    cast_params(model, ptdtype)
    return model.to(device), file_dtype


def make_trainable(model, args, log):
    """Upcycle / add LoRA / unfreeze per --mode (PESC options, LoRA options), in place."""
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                lora_targets=targets)
    if args.mode == "pesc" and model.config.moe is None:
        cfg = moe.PESCConfig(num_experts=args.num_experts, top_k=args.top_k, adapter_dim=args.adapter_dim,
                             adapter_scaling=args.adapter_scaling, adapter_dropout=args.adapter_dropout,
                             aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef, **lora)
        moe.upcycle(model, cfg)
        log(f"upcycled the dense checkpoint: {cfg.num_experts} experts, top-{cfg.top_k}, "
            f"adapter_dim {cfg.adapter_dim}, scaling {cfg.adapter_scaling}")
    elif args.mode == "pesc":
        # A PESC checkpoint keeps its experts; the training knobs come from the options.
        old = model.config.moe
        has_lora = any(isinstance(m, moe.LoRALinear) for m in model.modules())
        if has_lora and args.lora_rank != old.lora_rank:
            raise ValueError(f"{args.init_from} holds unmerged LoRA of rank {old.lora_rank}; --lora_rank is "
                             f"{args.lora_rank}")
        if has_lora:  # the checkpoint's LoRA modules keep their own alpha, dropout and targets
            lora = {f: getattr(old, f) for f in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
        cfg = replace(old, adapter_dropout=args.adapter_dropout, aux_loss_coef=args.aux_loss_coef,
                      z_loss_coef=args.z_loss_coef, **lora)
        model.config = replace(model.config, moe=cfg)  # the PESC settings' one home
        if cfg.lora_rank > 0 and not has_lora:
            moe.add_lora(model, targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        moe.set_trainable(model, "pesc")
        log(f"continuing the PESC checkpoint: {old.num_experts} experts, top-{old.top_k}, "
            f"adapter_dim {old.adapter_dim} (its architecture wins over the PESC options)")
    elif args.mode == "lora":
        if model.config.moe is not None:
            raise ValueError(f"--mode lora is the dense baseline, but {args.init_from} is a PESC checkpoint")
        if args.lora_rank <= 0:
            raise ValueError("--mode lora needs --lora_rank > 0")
        moe.add_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
        moe.set_trainable(model, "lora")
    else:
        moe.set_trainable(model, "full")
    return model


def cast_params(module, ptdtype):
    """Frozen tensors in the compute dtype; trainable ones in fp32 (the optimizer's master copy,
    autocast computes in ptdtype)."""
    nf4_bytes = {id(m.storage) for m in module.modules() if isinstance(m, quant.NF4Linear) and m.layout}
    for p in module.parameters():
        if id(p) not in nf4_bytes:  # an NF4 base's packed bytes are never converted (NF4Linear.flatten_)
            p.data = p.data.float() if p.requires_grad else p.data.to(ptdtype)


def shard_model(model, args, ptdtype, where):
    """FSDP2: cast, checkpoint (--grad_checkpointing) and shard each block, then the root.

    Block by block, so that a memory-mapped base is only ever read (and cast) one block at a
    time, each rank keeping its own shard of every tensor. Frozen and trainable tensors share a
    block: FSDP2 shards per tensor and reduces gradients only for the trainable ones. An NF4 base
    is sharded too: each NF4 linear's packed bytes become one frozen parameter, typed as the
    all-gather dtype so that mixed precision leaves the bytes alone (quant.NF4Linear.flatten_)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(where.device_type, (where.world,))
    # bf16 all-gathers and compute, fp32 gradient reduction (and fp32 master weights)
    mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) \
        if ptdtype != torch.float32 else MixedPrecisionPolicy()
    storage = quant.NF4Linear.storage_dtype(ptdtype)
    for block in model.layers:
        cast_params(block, ptdtype)
        for m in block.modules():
            if isinstance(m, quant.NF4Linear):
                m.flatten_(storage)
        if args.grad_checkpointing:  # before sharding: the recompute runs inside the block's hooks
            enable_grad_checkpointing(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if not model.config.tie_embeddings:  # each its own unit: never both read in whole at once
        for part in (model.tok_embeddings, model.output):
            cast_params(part, ptdtype)
            fully_shard(part, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(model.output, "loss")  # the fused LM head + loss reads its weight
    cast_params(model, ptdtype)  # what is left: the last norm (and a tied embedding)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.inv_freq = model.inv_freq.to(where.device)
    return model


def enable_grad_checkpointing(*blocks):
    """Recompute these blocks' activations in the backward pass, from outside the model."""
    for block in blocks:
        block.forward = (lambda f: lambda *a, **kw: checkpoint(f, *a, use_reentrant=False, **kw))(block.forward)


def param_group_names(model):
    """Names of the trainable tensors in AdamW's two groups: with weight decay, and without (norms,
    biases). The optimizer's state refers to tensors by their place in these lists."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]
def compile_blocks(model, **options):
    """Regional compilation: each transformer block is compiled in place, the rest stays eager.
    The blocks share their code, so one graph serves them all (two with a frozen embedding: the
    first block's input needs no gradient): fast to compile, unlike the whole model, and the
    state-dict keys do not change."""
    for block in model.layers:
        block.compile(**options)


def trainable_state(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_state(path, model, optimizer, meta):
    """Write train_state/ so that a crash at any moment leaves a complete state on disk.

    Everything goes to a temporary directory (state.json last), which replace_dir renames over the
    old one; a crash between its two renames leaves the old state as path.old, which find_state
    reads and this function first moves back."""
    from safetensors.torch import save_file

    reclaim_old_state(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-train_state-", dir=os.path.dirname(path))
    try:
        save_file({n: t.contiguous() for n, t in trainable_state(model).items()},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f, indent=2)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def reclaim_old_state(path):
    """Move path.old back to path when a crash between replace_dir's two renames left only it."""
    if not os.path.exists(path) and find_state(path) == path + ".old":
        os.rename(path + ".old", path)


def save_sharded(path, model, optimizer, meta, master):
    """train_state/ of an FSDP run: every rank writes its shards of the trainable tensors and the
    optimizer (torch.distributed.checkpoint) into one temporary directory that rank 0 renames over
    the old state (as save_state does) once all are written. The frozen base is never saved.

    Every rank must see out_dir at the same path (one machine, or a shared filesystem)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    tmp = os.path.join(os.path.dirname(path), f".tmp-train_state-{meta['iter']}")  # one name for all ranks
    if master:
        reclaim_old_state(path)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        # returns on every rank once all shards and the metadata are written
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(tmp, SHARDED))
        if master:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(meta, f, indent=2)
            replace_dir(tmp, path)
    except BaseException:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()


SHARDED = "sharded"  # the directory of train_state/ that holds an FSDP run's torch.distributed.checkpoint


def check_trainable(model, shapes, path):
    """The saved trainable tensors (name -> shape) must be exactly the model's, in the same shapes."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(shapes) != expected:
        extra, missing = sorted(set(shapes) - expected), sorted(expected - set(shapes))
        raise KeyError(f"{path}: trainable tensors do not match the model "
                       f"(unexpected {extra[:3]}, missing {missing[:3]}); was it saved with other model options?")
    for n, shape in shapes.items():
        if tuple(shape) != tuple(params[n].shape):
            raise ValueError(f"{path}: {n} has shape {tuple(shape)}, the model {tuple(params[n].shape)}; "
                             f"was it saved with other model options?")


def load_trainable(model, path):
    """Load trainable.safetensors strictly: exactly the model's trainable tensors, same shapes."""
    from safetensors.torch import load_file

    saved = load_file(path)
    check_trainable(model, {n: t.shape for n, t in saved.items()}, path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)


def load_sharded(model, optimizer, path):
    """Load an FSDP run's sharded state into a model sharded or not, on any number of ranks
    (torch.distributed.checkpoint reads each rank's part of every saved tensor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(path, SHARDED),
             no_dist=not dist.is_initialized())  # one process: read every shard here
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)


def load_full_into_sharded(model, optimizer, path):
    """Load a DDP / one-process state (trainable.safetensors, optimizer.pt) into an FSDP model:
    every rank reads the whole (small) trainable state and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    full = load_file(os.path.join(path, "trainable.safetensors"))
    check_trainable(model, {n: t.shape for n, t in full.items()}, path)
    saved = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    names = [n for group in param_group_names(model) for n in group]  # optimizer.pt numbers them so
    by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def export(model, out_dir, dtype, init_from, template, template_given, options, writer=True):
    """Write the final standalone checkpoint at the root of out_dir, file by file atomically.

    LoRA is merged into the base weights. The tokenizer files of init_from come along, and
    tokenizer_config.json names the chat template (when there was none, or --template chose it).
    An FSDP model is gathered one tensor at a time, so no rank ever holds the whole model: every
    rank calls this (the gathers are collectives), the one with writer=True writes."""
    from torch.distributed.tensor import DTensor

    # Frozen tensors are copied from init_from's files: the model held them in the compute dtype
    # (bf16 on GPU), which would round an fp16 or fp32 base. LoRA deltas are added to the file's
    # values in fp32.
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, moe.LoRALinear)}
    config = model.config  # the exported model: LoRA merged, every base weight in full precision
    if config.moe is not None:
        config = replace(config, moe=replace(config.moe, lora_rank=0))
    with torch.device("meta"):
        keys = list(Transformer(config).state_dict())  # an NF4 model's own state dict lacks its base
    current = model.state_dict()
    base_file = {}
    for fname in checkpoint_files(init_from):
        with safe_open(fname, framework="pt") as f:
            base_file.update((k, fname) for k in f.keys())
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach()  # noqa: E731

    def tensors():  # one at a time, so the export never holds a second copy of the model
        for k in keys:
            if k == "output.weight" and config.tie_embeddings:
                continue
            from_model = k in trained or k not in base_file
            t = full(current[k]) if from_model else None
            delta = None
            if k in lora:
                m = lora[k]
                delta = m.scale * (full(m.lora_b).float() @ full(m.lora_a).float())
            if not writer:
                continue
            if not from_model:
                with safe_open(base_file[k], framework="pt") as f:
                    t = f.get_tensor(k)
            yield k, ((t.float() + delta.cpu()) if delta is not None else t).to(dtype).contiguous()
    if not writer:
        for _ in tensors():
            pass
        return
    stage = tempfile.mkdtemp(prefix=".tmp-export-", dir=out_dir)
    try:
        extra = tokenizer_files(init_from)
        write_tokenizer_config(stage, init_from, template, keep_src_template=not template_given)
        with open(os.path.join(stage, "training_args.json"), "w") as f:
            json.dump(options, f, indent=2)
        extra += [(os.path.join(stage, n), n) for n in ("tokenizer_config.json", "training_args.json")]
        ckpt = os.path.join(stage, "ckpt")
        write_checkpoint(ckpt, config.to_dict(), tensors(), extra_files=extra)
        # out_dir also holds train_state/ and metrics.jsonl, so the export cannot be one rename.
        # config.json makes a directory a checkpoint: the old one goes first and the new one comes
        # last, so a crash while moving leaves no checkpoint (resume to finish it), never a mixed one.
        names = sorted(os.listdir(ckpt), key=lambda n: n == "config.json")
        if os.path.exists(os.path.join(out_dir, "config.json")):
            os.remove(os.path.join(out_dir, "config.json"))
        for old in os.listdir(out_dir):  # shards of an earlier export that this one does not have
            if (old.startswith("model") and old.endswith((".safetensors", ".index.json"))) and old not in names:
                os.remove(os.path.join(out_dir, old))
        for n in names:
            os.replace(os.path.join(ckpt, n), os.path.join(out_dir, n))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -----------------------------------------------------------------------------
# Training

# Exit status of a run stopped by SIGTERM or SIGINT after saving its state (EX_TEMPFAIL of
# sysexits.h: nothing is wrong, run the same thing again with --resume).
PREEMPTED = 75


@dataclass
class Dist:
    """Where this process runs: its rank among `world` processes and its device."""
    ddp: bool
    rank: int
    world: int
    device: str
    device_type: str
    fsdp: bool = False  # the model is sharded (FSDP2) rather than replicated (DDP)

    @property
    def master(self):
        return self.rank == 0


@dataclass
class Run:
    """A training job as setup() builds it and train_step() advances it."""
    args: argparse.Namespace
    dist: Dist
    log: object
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    raw_model: Transformer
    optimizer: torch.optim.Optimizer
    params: list
    data: InstructionData
    tokenizer: Tokenizer
    file_dtype: torch.dtype
    autocast: object
    state_dir: str
    base_fp: str
    data_fp: str
    total: int  # optimizer steps of the whole run
    it: int = 0  # optimizer steps done
    data_row: int = 0  # rows of the data stream consumed
    last_saved: int | None = None

    @property
    def rows_per_step(self):
        return self.args.batch_size * self.args.grad_accum_steps * self.dist.world


def dropout_seed(seed, row):
    """The seed of every random mask of the micro-batch whose first row is `row` of the data stream.

    A function of the run's seed and the data position only: the same rows get the same dropout
    masks whatever the world size, the split into ranks and accumulation, or where a resume began."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop stops after the step it is in, saves, and exits.

    A second signal of the same kind gets the default behaviour (kill, KeyboardInterrupt)."""

    def __init__(self):
        self.received, self._old = None, {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old[signum])

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def find_state(state_dir):
    """The complete training state on disk: state_dir, or its `.old` twin when a crash came between
    the two renames of replace_dir; None when there is none."""
    for path in (state_dir, state_dir + ".old"):
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def reduce_stats(stats, ddp):
    """Sum a dict of named tensors over all ranks with one all-reduce."""
    flat = torch.cat([t.reshape(-1).float() for t in stats.values()])
    if ddp:
        dist.all_reduce(flat)
    out, i = {}, 0
    for k, t in stats.items():
        out[k], i = flat[i:i + t.numel()].view(t.shape), i + t.numel()
    return out


def to_device(batch, device):
    idx, targets, kw = batch
    return idx.to(device), targets.to(device), {k: v.to(device) for k, v in kw.items()}


def train(args, given=frozenset()):
    """Run one training job; returns {"iter", "loss", "val_loss", "out_dir", "stopped"}."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if args.fsdp and not ddp:
        raise SystemExit("train.py: --fsdp shards the model over several processes; launch it with torchrun, "
                         "e.g. torchrun --standalone --nproc_per_node=NUM_GPUS train.py --fsdp ... "
                         "(or drop --fsdp for one process)")
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    device = f"cuda:{local_rank}" if ddp and device_type == "cuda" else args.device
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        with StopSignal() as stop:
            run = setup(args, given, Dist(ddp, rank, world, device, device_type, fsdp=args.fsdp))
            return loop(run, stop)
    finally:
        if ddp:
            dist.destroy_process_group()


def setup(args, given, where):
    """Options (merged with a resumed run's), data, model, optimizer, and the resumed state."""
    state_dir = os.path.join(args.out_dir, "train_state")
    saved = find_state(state_dir) if args.resume else None
    if args.resume and saved is None:
        raise FileNotFoundError(f"--resume: {os.path.join(state_dir, 'state.json')} does not exist")
    state = read_state(saved, args, given) if saved else None
    if state is not None:
        args = state["args"]
    if not args.init_from or not args.data:
        raise SystemExit("train.py: pass --init_from CKPT and --data FILE (or no arguments at all for the demo)")
    log = print if where.master else (lambda *a, **k: None)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if where.device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = getattr(torch, args.dtype)
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(where.device_type, dtype=ptdtype)
    log("options:\n" + "\n".join(f"  --{k} {v}" for k, v in vars(args).items()))
    if where.master:
        os.makedirs(args.out_dir, exist_ok=True)
        for name in os.listdir(args.out_dir):  # what a crash in the middle of a save left behind
            if name.startswith((".tmp-train_state-", ".tmp-export-")):
                shutil.rmtree(os.path.join(args.out_dir, name), ignore_errors=True)

    # The base fingerprint and the data's hash tie a resumed run to what it started from.
    base_fp, data_fp = fingerprint(args.init_from), data_hash(args.data)
    tokenizer = Tokenizer(args.init_from, template=args.template or None)
    # One process per machine tokenizes into the cache; the others wait for it and map it.
    data = InstructionData(args.data, tokenizer, args.seq_len, tokenizer.template, args.pack, args.val_fraction,
                           args.seed, log, fields=args.fields.split(",") if args.fields else None,
                           cache_dir=args.cache_dir, rebuild_cache=args.rebuild_cache,
                           workers=args.data_workers or len(os.sched_getaffinity(0)),
                           builder=int(os.environ.get("LOCAL_RANK", 0)) == 0,
                           build_id=os.environ.get("TORCHELASTIC_RUN_ID"))
    log(data.summary() + f"; template {tokenizer.template}")

    # Same seed on every rank while building, so that new adapters start identical everywhere.
    torch.manual_seed(args.seed)
    model, file_dtype = setup_model(args, where.device if not where.fsdp else "cpu", ptdtype, log,
                                    sharded=where.fsdp, quantize_on=where.device)
    log(moe.trainable_report(model))
    if where.fsdp:
        shard_model(model, args, ptdtype, where)
        if args.quantize:
            nf4 = [m.storage for m in model.modules() if isinstance(m, quant.NF4Linear)]
            log(f"NF4 base sharded over {where.world} ranks: {sum(p.to_local().nbytes for p in nf4) / 2**20:.2f} "
                f"MiB of {sum(p.nbytes for p in nf4) / 2**20:.2f} MiB on rank 0")
    elif args.grad_checkpointing:
        enable_grad_checkpointing(*model.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    decay, no_decay = ([named[n] for n in names] for names in param_group_names(model))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), fused=where.device_type == "cuda")
    rows_per_step = args.batch_size * args.grad_accum_steps * where.world
    total = args.max_iters or max(1, math.ceil(args.epochs * len(data.train_rows) / rows_per_step))
    run = Run(args, where, log, model, model, optimizer, params, data, tokenizer, file_dtype, autocast,
              state_dir, base_fp, data_fp, total)
    if state is not None:
        restore(run, saved, state)
    if args.compile:
        compile_blocks(run.raw_model)
    if where.ddp and not where.fsdp:
        # no buffer broadcast per step: the buffers (RoPE, an NF4 base) are equal on every rank.
        # torch 2.13 renamed the option (the old name warns); 2.11 and 2.12 know only the old one.
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        run.model = DDP(run.model, device_ids=[where.device] if where.device_type == "cuda" else None,
                        **{no_sync: False})
    start_metrics(run, resumed=state is not None)
    return run


def read_state(path, args, given):
    """state.json of a resumed run, with "args": the saved options, overridden by those given now.

    An option that changes what is computed must not change, except the split of a step's rows
    between ranks and accumulation: the rows per step must stay the same."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved = state["options"]
    for k in sorted(given - RESUME_MAY_CHANGE):
        if getattr(args, k) != saved.get(k):
            raise ValueError(f"--resume: --{k} is {getattr(args, k)!r} but the run in {path} used "
                             f"{saved.get(k)!r}; an exact resume needs the same value")
    known = vars(build_parser().parse_args([]))
    state["args"] = argparse.Namespace(**{**known, **{k: v for k, v in saved.items() if k in known},
                                          **{k: getattr(args, k) for k in given}, "device": args.device,
                                          "fsdp": args.fsdp})  # how this run is launched decides
    return state


def restore(run, path, state):
    """Load the trainable tensors, the optimizer and the data position of a saved run."""
    if state["base_fingerprint"] != run.base_fp:
        raise ValueError(f"--resume: {run.args.init_from} is not the checkpoint the run in {path} started "
                         f"from (fingerprint {run.base_fp[:12]} != {state['base_fingerprint'][:12]})")
    if state["data_hash"] != run.data_fp:
        raise ValueError(f"--resume: {run.args.data} differs from the data the run in {path} read")
    saved_rows = state.get("rows_per_step", state["options"]["batch_size"] * state["options"]["grad_accum_steps"]
                           * state.get("world_size", 1))
    if saved_rows != run.rows_per_step:
        a = run.args
        fix = saved_rows / (a.batch_size * run.dist.world)
        hint = f"--grad_accum_steps {int(fix)}" if fix == int(fix) else "a --grad_accum_steps that gives as many"
        raise ValueError(f"--resume: the run in {path} took {saved_rows} rows per optimizer step, now "
                         f"--batch_size {a.batch_size} x --grad_accum_steps {a.grad_accum_steps} x "
                         f"{run.dist.world} rank{'s' if run.dist.world > 1 else ''} = {run.rows_per_step}; pass {hint}")
    if os.path.isdir(os.path.join(path, SHARDED)):  # written by an FSDP run
        check_trainable(run.raw_model, state["shapes"], path)
        load_sharded(run.raw_model, run.optimizer, path)
    elif run.dist.fsdp:
        load_full_into_sharded(run.raw_model, run.optimizer, path)
    else:
        load_trainable(run.raw_model, os.path.join(path, "trainable.safetensors"))
        run.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=run.dist.device,
                                                 weights_only=True))
    run.it, run.data_row = state["iter"], state["data_row"]
    run.last_saved = run.it
    run.log(f"resumed at iteration {run.it} (row {run.data_row} of the data stream) from {path}")


def start_metrics(run, resumed):
    """metrics.jsonl: a resumed run drops what its interrupted predecessor logged past the checkpoint."""
    if not run.dist.master:
        return
    path = os.path.join(run.args.out_dir, "metrics.jsonl")
    kept = []
    if resumed and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line).get("iter", 0) <= run.it]
    with open(path, "w") as f:
        f.writelines(kept)


def write_metrics(run, record):
    if run.dist.master:
        with open(os.path.join(run.args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def loop(run, stop):
    """Evaluate, step, log and save until the last step or a stop signal; then export."""
    args = run.args
    R = len(run.data.train_rows)
    run.log(f"training {run.total - run.it} steps of {run.rows_per_step} rows x {args.seq_len} tokens "
            f"(epoch {run.data_row / R:.2f} -> {(run.data_row + (run.total - run.it) * run.rows_per_step) / R:.2f})")
    loss_avg, val_loss = None, None
    clock = {"t": time.time(), "tokens": 0}  # tokens/s counts training time only
    run.model.train()
    while run.it < run.total:
        if run.data.val and args.eval_interval > 0 and run.it % args.eval_interval == 0:
            t_eval = time.time()
            val_loss = evaluate(run)
            clock["t"] += time.time() - t_eval
        lr = get_lr(run.it, run.total, args)
        step = train_step(run, lr, stop_requested=stop.received is not None)
        loss_avg = step["loss"] if loss_avg is None else 0.9 * loss_avg + 0.1 * step["loss"]
        clock["tokens"] += step["tokens"]
        if run.it % args.log_interval == 0 or run.it == run.total or step["stop"]:
            log_step(run, lr, step, clock)
        if step["stop"]:  # every rank saw the same all-reduced flag: all stop after this step
            save(run)
            if run.dist.ddp:
                dist.barrier()  # no rank exits (and makes torchrun kill the others) before the save is done
            why = stop.received or "a stop signal on another rank"
            launcher = f"torchrun --nproc_per_node={run.dist.world}" if run.dist.ddp else "python"
            run.log(f"stopped by {why} after iteration {run.it}; the state is in {run.state_dir}. Resume with:\n"
                    f"  {launcher} train.py --out_dir {args.out_dir} --resume{' --fsdp' if run.dist.fsdp else ''}")
            return {"iter": run.it, "loss": loss_avg, "val_loss": val_loss, "out_dir": args.out_dir,
                    "stopped": why}
        if args.save_interval > 0 and run.it % args.save_interval == 0 and run.it < run.total:
            save(run)

    if run.data.val:
        val_loss = evaluate(run)
    save(run)
    if run.dist.master or run.dist.fsdp:
        export(run.raw_model, args.out_dir, run.file_dtype, args.init_from, run.tokenizer.template,
               bool(args.template), vars(args), writer=run.dist.master)
        run.log(f"saved the {'PESC' if run.raw_model.config.moe is not None else 'dense'} checkpoint "
                f"to {args.out_dir}")
    return {"iter": run.it, "loss": loss_avg, "val_loss": val_loss, "out_dir": args.out_dir, "stopped": None}


def train_step(run, lr, stop_requested=False):
    """One optimizer step over this rank's micro-batches. Returns the step's statistics, summed over
    ranks in one all-reduce that also carries the stop flag, so that every rank stops together."""
    args, raw = run.args, run.raw_model
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    is_pesc = raw.config.moe is not None
    L, E = (raw.config.n_layers, raw.config.moe.num_experts) if is_pesc else (0, 0)
    zero = lambda *shape: torch.zeros(shape, device=run.dist.device)  # noqa: E731
    stats = {"lm_loss": zero(), "aux_loss": zero(), "z_loss": zero(), "tokens": zero(), "stop": zero(),
             "load": zero(L, E)}
    for micro in range(args.grad_accum_steps):
        start = run.data_row + (run.dist.rank * args.grad_accum_steps + micro) * args.batch_size
        idx, targets, kw = to_device(run.data.train_batch(start, args.batch_size), run.dist.device)
        torch.manual_seed(dropout_seed(args.seed, start))  # every dropout mask of these rows (CPU and CUDA)
        if run.dist.fsdp:  # reduce-scatter only after the last micro-step; until then grads add up unsharded
            run.model.set_requires_gradient_sync(micro == args.grad_accum_steps - 1)
        elif run.dist.ddp:
            # All-reduce the gradients only on the last micro-step: the earlier ones just
            # accumulate locally (what no_sync() does, without a context manager).
            run.model.require_backward_grad_sync = micro == args.grad_accum_steps - 1
        with run.autocast:
            out = run.model(idx, targets, **kw)
        (out.loss / args.grad_accum_steps).backward()
        with torch.no_grad():
            stats["lm_loss"] += out.lm_loss.float()
            if is_pesc:
                stats["aux_loss"] += out.aux_loss.float()
                stats["z_loss"] += out.z_loss.float()
                stats["load"] += out.expert_load.float()
            stats["tokens"] += idx.numel()  # positions computed, padding included
    stats["stop"] += float(stop_requested)
    if run.dist.fsdp:  # each rank holds a shard of every gradient: the squared norm is a sum over ranks
        with torch.no_grad():
            local = [p.grad.to_local() for p in run.params if p.grad is not None]
            stats["grad_sq"] = sum((g.float().pow(2).sum() for g in local), zero())
    stats = reduce_stats(stats, run.dist.ddp)
    for k in ("lm_loss", "aux_loss", "z_loss"):
        stats[k] /= args.grad_accum_steps * run.dist.world
    if run.dist.fsdp:
        grad_norm = stats["grad_sq"].sqrt()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(run.params, args.grad_clip, grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    # one host sync per step: the non-finite check must come before the update
    loss, norm, tokens, stop = torch.stack([stats["lm_loss"], grad_norm.float(), stats["tokens"],
                                            stats["stop"]]).tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        last = f"the last good checkpoint is {run.state_dir} (iteration {run.last_saved})" \
            if run.last_saved is not None else "no checkpoint was saved yet"
        raise RuntimeError(f"iteration {run.it + 1}: loss {loss}, grad norm {norm} is not finite; "
                           f"stopping before the update; {last}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.it += 1
    run.data_row += run.rows_per_step
    return {"loss": loss, "grad_norm": norm, "tokens": tokens, "stop": stop > 0, "aux_loss": stats["aux_loss"],
            "z_loss": stats["z_loss"], "load": stats["load"]}


def log_step(run, lr, step, clock):
    """One log line and one metrics.jsonl record for the step just taken."""
    dt = time.time() - clock["t"]
    tok_s = clock["tokens"] / dt
    record = {"iter": run.it, "loss": step["loss"], "lr": lr, "grad_norm": step["grad_norm"],
              "tokens_per_sec": tok_s, "epoch": run.data_row / len(run.data.train_rows)}
    line = f"iter {run.it}: loss {step['loss']:.4f}"
    load = step["load"]
    if load.numel():  # PESC: (L, E) share of the (token, slot) assignments per layer
        E = load.shape[-1]
        share = load / load.sum(-1, keepdim=True).clamp(min=1)
        imbalance = (share.max(-1).values * E).max().item()  # busiest expert vs a fair share
        record.update(aux_loss=step["aux_loss"].item(), z_loss=step["z_loss"].item(), load_max_over_mean=imbalance,
                      expert_load=[[round(x, 4) for x in row] for row in share.tolist()])
        line += f", aux {record['aux_loss']:.4f}"
    line += f", lr {lr:.2e}, grad norm {step['grad_norm']:.4f}, {tok_s:,.0f} tok/s"
    peak = peak_flops(run.dist.device, getattr(torch, run.args.dtype))  # args.dtype: resolved by setup
    if peak is not None:
        record["mfu"] = run.raw_model.estimate_mfu(tok_s / run.dist.world, run.args.seq_len, peak)
        line += f", mfu {100 * record['mfu']:.1f}%"
    if load.numel():
        line += f", load max/mean {imbalance:.2f}"
    run.log(line)
    write_metrics(run, record)
    clock["t"], clock["tokens"] = time.time(), 0


@torch.no_grad()
def evaluate(run):
    """Token-weighted LM loss over the held-out rows, in all and per data source, each rank taking
    its share; logged, and written to metrics.jsonl with "val_loss_by_source"."""
    raw, sources = run.raw_model, run.data.sources
    raw.eval()
    sums = torch.zeros(len(sources), 2, device=run.dist.device)  # per source: loss sum, target count
    for source in range(len(sources)):
        batches = list(run.data.val_batches(run.args.batch_size, run.dist.rank, run.dist.world, source))
        counted = len(batches)
        if run.dist.fsdp:
            # every forward all-gathers with the other ranks: a rank with fewer rows repeats a batch
            # (not counted) so that all ranks run as many forwards as rank 0, which has the most
            first = list(run.data.val_batches(run.args.batch_size, 0, run.dist.world, source))
            batches += (batches or first)[:1] * (len(first) - counted)
        for i, batch in enumerate(batches):
            idx, targets, kw = to_device(batch, run.dist.device)
            with run.autocast:
                lm_loss = raw(idx, targets, **kw).lm_loss
            n = (targets != IGNORE_INDEX).sum() * (i < counted)
            sums[source] += torch.stack([lm_loss.float() * n, n.float()])
    if run.dist.ddp:
        dist.all_reduce(sums)
    raw.train()
    total, n = sums.sum(0).tolist()
    val_loss = total / n if n > 0 else None
    by_source = {s["path"]: (x / m if m > 0 else None) for s, (x, m) in zip(sources, sums.tolist())}
    run.log(f"iter {run.it}: val loss {val_loss:.4f}" if val_loss is not None else f"iter {run.it}: no val targets")
    write_metrics(run, {"iter": run.it, "val_loss": val_loss, "val_loss_by_source": by_source})
    return val_loss


def save(run):
    """Write train_state/: rank 0 alone when every rank holds the same trainable tensors and
    optimizer (DDP), every rank its shards under FSDP."""
    shapes = {n: list(p.shape) for n, p in run.raw_model.named_parameters() if p.requires_grad}
    meta = {"iter": run.it, "data_row": run.data_row, "options": vars(run.args), "base_fingerprint": run.base_fp,
            "data_hash": run.data_fp, "trainable": sorted(shapes), "shapes": shapes,
            "world_size": run.dist.world, "rows_per_step": run.rows_per_step}
    if run.dist.fsdp:
        save_sharded(run.state_dir, run.raw_model, run.optimizer, meta, run.dist.master)
    elif run.dist.master:
        save_state(run.state_dir, run.raw_model, run.optimizer, meta)
    run.last_saved = run.it


# -----------------------------------------------------------------------------
# The built-in demo: `python train.py` with no arguments, a few minutes on 2 CPU cores

DEMO_DIR = "out/demo"
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def demo_word(rng):
    """A made-up word of 4 to 7 letters, e.g. 'tomek'."""
    word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3))))
    return word + rng.choice(("", rng.choice(CONSONANTS)))


# The skills: name, instruction, answer. The base model is pretrained on text that shows them as
# "Q: ... A: ..." lines; instruction tuning teaches it to answer in the chat format, and is
# checked on words it was never instructed with.
DEMO_TASKS = [
    ("last letter", lambda w: f"Last letter of {w}?", lambda w: w[-1]),
    ("last two", lambda w: f"Last two letters of {w}?", lambda w: w[-2:]),
    ("length", lambda w: f"How many letters in {w}?", lambda w: str(len(w))),
    ("vowel end", lambda w: f"Does {w} end in a vowel?", lambda w: "yes" if w[-1] in VOWELS else "no"),
]


def demo_data(data_dir, seed=0):
    """Write the demo's generated data (PESC/Camelidae JSON) and return the held-out questions.

    pretrain.json: plain-text documents (the `corpus` field) of "Q: ... A: ..." lines.
    sft.json: instruction records (`conversation`), some with a system prompt or two turns.
    The held-out questions use words that no instruction record contains."""
    rng = random.Random(seed)
    words = sorted({demo_word(rng) for _ in range(4000)})
    rng.shuffle(words)
    heldout_words, sft_words = words[:30], words[30:]

    def question(words):
        _, ask, answer = rng.choice(DEMO_TASKS)
        w = rng.choice(words)
        return ask(w), answer(w)

    all_words = words + [demo_word(rng) for _ in range(4000)]  # the base sees more words than the tuning
    # A random run of spaces before each answer: the base must find the word by its content, not
    # at a fixed distance, so that the skill still works once the chat template moves things.
    docs = []
    for _ in range(3000):
        qa = [question(all_words) for _ in range(4)]
        lines = ["Q: %s%sA: %s" % (q, " " * rng.randint(1, 13), a) for q, a in qa]
        docs.append({"corpus": "\n".join(lines), "dataset": "demo-pretrain", "instruction": "", "conversation": []})
    sft = []
    for i in range(4000):
        turns = [dict(zip(("input", "output"), question(sft_words))) for _ in range(1 + (i % 5 == 0))]
        system = "You are a careful assistant." if i % 4 == 0 else ""
        sft.append({"corpus": "", "dataset": "demo-sft", "instruction": system, "conversation": turns})
    heldout = [(name, ask(w), answer(w)) for name, ask, answer in DEMO_TASKS for w in heldout_words]
    os.makedirs(data_dir, exist_ok=True)
    for name, records in (("pretrain.json", docs), ("sft.json", sft)):
        with open(os.path.join(data_dir, name), "w") as f:
            json.dump(records, f)
    return heldout


@torch.no_grad()
def demo_eval(ckpt, questions):
    """Held-out loss on the answers, and exact-match accuracy of greedy answers per skill."""
    from sample import generate  # the project's sampler: one batch of left-padded prompts

    model = Transformer.from_pretrained(ckpt).eval()
    tok = Tokenizer(ckpt)
    total, count = 0.0, 0
    for _, question, answer in questions:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, target_mask = tok.encode_chat(messages)
        targets = torch.tensor([i if m else IGNORE_INDEX for i, m in zip(ids[1:], target_mask[1:])])
        lm_loss = model(torch.tensor([ids[:-1]]), targets[None]).lm_loss
        n = int((targets != IGNORE_INDEX).sum())
        total, count = total + lm_loss.item() * n, count + n
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for _, q, _ in questions]
    rows = generate(model, prompts, 8, temperature=0, stop_ids=tok.stop_ids)
    correct, samples = {}, []
    for (name, question, answer), prompt, row in zip(questions, prompts, rows):
        new = [i for i in row[row >= 0].tolist()[len(prompt):] if i not in tok.stop_ids]
        reply = tok.decode(new).strip()
        if name not in correct:  # one example per skill
            samples.append(f"    {question!r} -> {reply!r}" + ("" if reply == answer else f" (expected {answer!r})"))
        correct.setdefault(name, []).append(reply == answer)
    accuracy = {name: sum(v) / len(v) for name, v in correct.items()}
    return total / count, accuracy, samples


def stage(argv):
    """One training run of the demo; a stop signal ends the whole demo."""
    if train(*parse_args(argv))["stopped"]:
        sys.exit(PREEMPTED)


def demo():
    """Tokenizer, tiny dense base (pretrained here), PESC instruction tuning, before/after eval."""
    from model import ModelConfig
    from tokenizer import write_byte_tokenizer

    t0 = time.time()
    data_dir, init_dir, base_dir = (os.path.join(DEMO_DIR, d) for d in ("data", "init", "base"))
    print(f"PESC demo: everything goes to {DEMO_DIR}/")
    questions = demo_data(data_dir)

    # 1. A byte-level tokenizer (vocab 512 with Llama 3's specials) and a random tiny model.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")  # dim 64, 2 layers, vocab 512: 158K parameters
    Transformer(config).save_pretrained(init_dir)
    write_byte_tokenizer(os.path.join(init_dir, "tokenizer.model"))
    write_tokenizer_config(init_dir, chat_template="llama3")

    # 2. Pretrain it on plain text: the dense base that PESC starts from.
    print("\n== 1/3: pretraining the dense base on generated text (--mode full) ==")
    stage(["--init_from", init_dir, "--data", os.path.join(data_dir, "pretrain.json"),
                       "--out_dir", base_dir, "--mode", "full", "--device", "cpu", "--seq_len", "256",
                       "--batch_size", "8", "--grad_accum_steps", "1", "--max_iters", "2000", "--lr", "5e-3",
                       "--lr_schedule", "cosine", "--min_lr", "5e-4", "--warmup_iters", "30", "--beta2", "0.99",
                       "--grad_clip", "1.0", "--val_fraction", "0.02", "--eval_interval", "1000",
                       "--log_interval", "200", "--save_interval", "0"])
    before = demo_eval(base_dir, questions)

    # 3. Upcycle to PESC; train routers, adapters and LoRA (the official recipe's trainable parts).
    print("\n== 2/3: upcycling to PESC and instruction tuning (--mode pesc) ==")
    stage(["--init_from", base_dir, "--data", os.path.join(data_dir, "sft.json"),
                       "--out_dir", DEMO_DIR, "--mode", "pesc", "--device", "cpu", "--num_experts", "4",
                       "--top_k", "2", "--adapter_dim", "32", "--adapter_scaling", "1.0", "--adapter_dropout", "0",
                       "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--seq_len", "256",
                       "--batch_size", "8", "--grad_accum_steps", "1", "--max_iters", "500", "--lr", "3e-3",
                       "--warmup_iters", "20", "--beta2", "0.99", "--grad_clip", "1.0", "--val_fraction", "0.02",
                       "--eval_interval", "250", "--log_interval", "50", "--save_interval", "0"])
    after = demo_eval(DEMO_DIR, questions)

    print(f"\n== 3/3: {len(questions)} held-out instructions (words never seen in instruction tuning) ==")
    for name, (loss, accuracy, samples) in (("dense base, before", before), ("PESC, after", after)):
        overall = sum(accuracy.values()) / len(accuracy)
        print(f"  {name}: held-out loss {loss:.3f}, exact match {100 * overall:.0f}% ("
              + ", ".join(f"{task} {100 * a:.0f}%" for task, a in accuracy.items()) + ")")
        print("\n".join(samples))
    print(f"\ndone in {time.time() - t0:.0f} s. Chat with it:\n"
          f"  python sample.py --ckpt {DEMO_DIR} --chat --temperature 0 --prompt 'Last letter of sapo?'")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args, given = parse_args(argv)
    if args.plan:
        return print_plan(args)
    return train(args, given)


def print_plan(args):
    """--plan: build the run's model on the meta device (no weights read) and print its memory per GPU."""
    import plan
    from model import PRESETS, ModelConfig

    if args.world_size < 1:
        raise SystemExit(f"train.py --plan: --world_size must be at least 1, got {args.world_size}")
    cfg_file = os.path.join(args.init_from, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = ModelConfig.from_dict(json.load(f), cfg_file)
    elif args.init_from in PRESETS:
        config = ModelConfig.from_preset(args.init_from)
    else:
        raise SystemExit(f"train.py --plan: --init_from {args.init_from!r} is neither a checkpoint directory "
                         f"(no config.json) nor a preset ({', '.join(PRESETS)})")
    dtype = torch.float32 if args.dtype == "float32" else getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16")
    check_quantize(args)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = make_trainable(Transformer(config), args, lambda *a: None)
    cast_params(model, dtype)
    result = plan.memory_plan(model, world=args.world_size, fsdp=args.fsdp, batch=args.batch_size,
                              seq_len=args.seq_len, grad_accum_steps=args.grad_accum_steps,
                              grad_checkpointing=args.grad_checkpointing, compute_dtype=dtype,
                              gpu_mem_gb=args.gpu_mem_gb, packed=args.pack, quantize=args.quantize or None)
    print(json.dumps(result) if args.json else plan.format_plan(result))
    return result


if __name__ == "__main__":
    result = main()
    sys.exit(PREEMPTED if result and result.get("stopped") else 0)
