"""
Instruction-tune a LLaMA-family checkpoint into a PESC model (or a dense LoRA / full baseline).

    python train.py                                          # the built-in CPU demo (below)
    python train.py --ckpt CKPT --data DATA.json --out_dir out/run
    torchrun --standalone --nproc_per_node=8 train.py --ckpt CKPT --data DATA.json

A dense --ckpt is upcycled (moe.make_trainable) with the PESC options; a PESC one keeps its
experts and trains on. Only trainable tensors go to AdamW. --batch_size and --grad_accum_steps
are per rank: one optimizer step sees batch_size * grad_accum_steps * world_size rows.

out_dir ends up holding a standalone project checkpoint (config.json, model.safetensors, the
tokenizer; LoRA merged) that sample.py and convert.py read, metrics.jsonl, and train_state/
(checkpoint.py) that --resume continues from exactly.
"""

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import cli
import moe
import quant
import skills
from data import IGNORE_INDEX, InstructionData, data_hash
from files import checkpoint_fingerprint
from model import ModelConfig, Transformer, peak_flops
from tokenizer import Tokenizer, write_byte_tokenizer, write_tokenizer_config

# -----------------------------------------------------------------------------
# Options

# Old option names that still work (with a note), new name first in the parser
RENAMED = {"--init_from": "--ckpt", "--top_k": "--experts_per_token"}
PESC_OPTIONS = {"top_k": "experts_per_token"}  # PESCConfig fields whose option has another name


def build_parser():
    # Defaults follow the official PESC recipe (the paper's training script) where it has one:
    # moe.PESCConfig's and moe.LoRAConfig's, each field an option.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="", help="project checkpoint to start from (dense or PESC)")
    p.add_argument("--data", default="", help="a data file (.json, .jsonl, .jsonl.gz, .parquet; chat, ShareGPT, "
                   "Alpaca, prompt/response or PESC records) or a mixture a.parquet:0.5,b.jsonl:0.5 (weights: "
                   "shares of the training rows; bare paths a,b: every row of each)")
    p.add_argument("--out_dir", default="out/pesc")
    p.add_argument("--mode", default="pesc", choices=moe.TRAIN_MODES,
                   help="pesc: routers + adapters (+ LoRA); lora, full: the dense baselines")
    cli.add_config_options(p.add_argument_group("PESC (used when upcycling a dense checkpoint)"), moe.PESCConfig,
                           names=PESC_OPTIONS)
    cli.add_config_options(p.add_argument_group("LoRA on the base linears (--lora_rank 0: none; --mode lora "
                                                "needs it)"), moe.LoRAConfig, prefix="lora_")
    g = p.add_argument_group("data")
    g.add_argument("--template", default="", help="chat template; default: the checkpoint tokenizer's")
    g.add_argument("--seq_len", type=int, default=512)
    g.add_argument("--pack", default=True, **cli.FLAG, help="pack several examples per row (--pack false: one per row)")
    g.add_argument("--val_fraction", type=float, default=0.01, help="share of examples held out")
    g.add_argument("--fields", default="", type=field_names, help="PROMPT_KEY,RESPONSE_KEY of prompt/response records "
                   "whose keys are ambiguous or uncommon")
    g.add_argument("--cache_dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                       "pesc", "data"), help="where the token cache lives")
    g.add_argument("--rebuild_cache", default=False, **cli.FLAG, help="tokenize again even if the cache has the data")
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
    # fp16 would need loss scaling, which this loop does not do: GPUs without bf16 train in fp32
    cli.add_device_dtype(g, dtypes=("auto", "fp32", "bf16"))
    g.add_argument("--quantize", default="", choices=["", "nf4"],
                   help="nf4: QLoRA, the frozen base linears in 4-bit NF4 (quant.py), as the official recipe")
    g.add_argument("--compile", default=False, **cli.FLAG, help="torch.compile each transformer block (regional)")
    g.add_argument("--grad_checkpointing", default=False, **cli.FLAG)
    g.add_argument("--resume", default=False, **cli.FLAG, help="continue from out_dir/train_state")
    g = p.add_argument_group("memory plan (prints, trains nothing)")
    g.add_argument("--plan", default=False, **cli.FLAG, help="print the memory per GPU of this run and exit")
    g.add_argument("--world_size", type=int, default=1, help="--plan: GPUs of the run")
    g.add_argument("--gpu_mem_gb", type=float, default=None, help="--plan: GiB per GPU, for the largest micro-batch")
    g.add_argument("--json", default=False, **cli.FLAG, help="--plan: one JSON object (bytes per GPU)")
    g.add_argument("--fsdp", default=False, **cli.FLAG,
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
    argv = cli.rename(argv, RENAMED)
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.set_defaults(**{k: _UNSET for k in vars(args)})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET}
    return args, given


def pesc_config(args) -> moe.PESCConfig:
    return cli.config_from_options(moe.PESCConfig, args, names=PESC_OPTIONS)


def lora_config(args):
    """The LoRA the options ask for, or None (--lora_rank 0)."""
    return cli.config_from_options(moe.LoRAConfig, args, prefix="lora_") if args.lora_rank > 0 else None


# Options that may differ when resuming: they do not change what is computed step by step.
# grad_accum_steps may change with the world size as long as the rows per step stay the same
# (checked in restore): dropout masks are keyed to the data position, not to the rank.
RESUME_MAY_CHANGE = {"max_iters", "epochs", "eval_interval", "save_interval", "log_interval", "device",
                     "compile", "grad_checkpointing", "resume", "out_dir", "ckpt", "data",
                     "grad_accum_steps", "cache_dir", "rebuild_cache", "data_workers",
                     "fsdp", "plan", "world_size", "gpu_mem_gb", "json"}


def get_lr(it, total, args):
    """Linear warmup to --lr, then constant or cosine down to --min_lr at the last step."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if args.lr_schedule == "constant":
        return args.lr
    progress = (it - args.warmup_iters) / max(1, total - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - args.min_lr)


# -----------------------------------------------------------------------------
# The model a run trains: loaded, made trainable, cast, sharded, and its optimizer

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

    @classmethod
    def one_process(cls, device):
        device = str(cli.resolve_device(device))
        return cls(False, 0, 1, device, "cuda" if device.startswith("cuda") else "cpu")


def check_quantize(args):
    if args.quantize and args.mode == "full":
        raise ValueError(f"--quantize {args.quantize} freezes the base linears; --mode full would train them")


def load_model(args, where, dtype):
    """The base at --ckpt, loaded strictly: (model, the dtype of its files, which the export keeps).

    NF4 (--quantize) is quantized as the tensors stream in, by the run's device, so the
    full-precision base is never resident. Under FSDP the base stays memory-mapped in CPU memory
    in its file dtype for shard_model to cast and shard block by block; otherwise it comes in
    dtype on the device."""
    check_quantize(args)
    model = Transformer.from_pretrained(args.ckpt, device=where.device if not where.fsdp else "cpu",
                                        quantize=args.quantize or None, mmap=where.fsdp, quantize_on=where.device)
    file_dtype = model.tok_embeddings.weight.dtype
    if not where.fsdp:
        for p in model.parameters():  # parameters only: the RoPE buffer stays fp32
            p.data = p.data.to(dtype)
    return model, file_dtype


def prepare_model(model, args, where, dtype, log):
    """Make `model` what --mode trains (moe.make_trainable with the PESC and LoRA options), then
    place it: sharded block by block under FSDP, else frozen tensors in dtype and trained ones in
    fp32 on the device, each block checkpointed with --grad_checkpointing. Returns the model."""
    was_pesc = model.config.moe is not None
    try:
        moe.make_trainable(model, args.mode, pesc_config(args), lora_config(args))
    except ValueError as e:
        raise ValueError(f"--ckpt {args.ckpt}: {e}") from None
    c = model.config.moe
    if args.mode == "pesc":
        log(f"{'continuing the PESC checkpoint' if was_pesc else 'upcycled the dense checkpoint'}: "
            f"{c.num_experts} experts, top-{c.top_k}, adapter_dim {c.adapter_dim}, scaling {c.adapter_scaling}"
            + (" (its architecture wins over the PESC options)" if was_pesc else ""))
    log(moe.trainable_report(model))
    if where.fsdp:
        return shard_model(model, args, dtype, where)
    moe.cast_for_training(model, dtype)
    if args.grad_checkpointing:
        enable_grad_checkpointing(*model.layers)
    return model.to(where.device)


def make_optimizer(model, args, where):
    """AdamW over the trainable tensors: (optimizer, those tensors)."""
    named = dict(model.named_parameters())
    decay, no_decay = ([named[n] for n in names] for names in checkpoint.param_group_names(model))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), fused=where.device_type == "cuda")
    return optimizer, [p for p in model.parameters() if p.requires_grad]


def shard_model(model, args, dtype, where):
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
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
        if dtype != torch.float32 else MixedPrecisionPolicy()
    storage = quant.NF4Linear.storage_dtype(dtype)
    for block in model.layers:
        moe.cast_for_training(block, dtype)
        for m in block.modules():
            if isinstance(m, quant.NF4Linear):
                m.flatten_(storage)
        if args.grad_checkpointing:  # before sharding: the recompute runs inside the block's hooks
            enable_grad_checkpointing(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if not model.config.tie_embeddings:  # each its own unit: never both read in whole at once
        for part in (model.tok_embeddings, model.output):
            moe.cast_for_training(part, dtype)
            fully_shard(part, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(model.output, "loss")  # the fused LM head + loss reads its weight
    moe.cast_for_training(model, dtype)  # what is left: the last norm (and a tied embedding)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.inv_freq = model.inv_freq.to(where.device)
    return model


def enable_grad_checkpointing(*blocks):
    """Recompute these blocks' activations in the backward pass, from outside the model."""
    for block in blocks:
        block.forward = (lambda f: lambda *a, **kw: torch.utils.checkpoint.checkpoint(
            f, *a, use_reentrant=False, **kw))(block.forward)


def compile_blocks(model, **options):
    """Regional compilation: each transformer block is compiled in place, the rest stays eager.
    The blocks share their code, so one graph serves them all (two with a frozen embedding: the
    first block's input needs no gradient): fast to compile, unlike the whole model, and the
    state-dict keys do not change."""
    for block in model.layers:
        block.compile(**options)



# -----------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """A training job: what train_step() needs to advance it, and the bookkeeping of the loop."""
    args: argparse.Namespace
    dist: Dist
    log: object
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    raw_model: Transformer
    optimizer: torch.optim.Optimizer
    params: list
    data: InstructionData  # or anything with train_batch(start, batch_size) (bench.py)
    dtype: torch.dtype  # the compute dtype (autocast's when not fp32)
    tokenizer: Tokenizer = None
    file_dtype: torch.dtype = None
    state_dir: str = ""
    base_fp: str = ""
    data_fp: str = ""
    total: int = 0  # optimizer steps of the whole run
    it: int = 0  # optimizer steps done
    data_row: int = 0  # rows of the data stream consumed
    last_saved: int | None = None
    autocast: object = field(init=False)

    def __post_init__(self):
        self.autocast = nullcontext() if self.dtype == torch.float32 else \
            torch.autocast(self.dist.device_type, dtype=self.dtype)

    @property
    def rows_per_step(self):
        return self.args.batch_size * self.args.grad_accum_steps * self.dist.world


def dropout_seed(seed, row):
    """The seed of every random mask of the micro-batch whose first row is `row` of the data stream.

    A function of the run's seed and the data position only: the same rows get the same dropout
    masks whatever the world size, the split into ranks and accumulation, or where a resume began."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


# Exit status of a run stopped by SIGTERM or SIGINT after saving its state (EX_TEMPFAIL of
# sysexits.h: nothing is wrong, run the same thing again with --resume).
PREEMPTED = 75


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
    where = Dist.one_process(args.device)
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        device = f"cuda:{local_rank}" if where.device_type == "cuda" else where.device
        where = Dist(True, rank, world, device, where.device_type, fsdp=args.fsdp)
        if where.device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if where.device_type == "cuda" else "gloo")
    try:
        with StopSignal() as stop:
            return loop(setup(args, given, where), stop)
    finally:
        if ddp:
            dist.destroy_process_group()


# what train_state/state.json says about itself: 2 since the fingerprints are files.py's
STATE_FORMAT = 2


def setup(args, given, where):
    """Options (merged with a resumed run's), data, model, optimizer, and the resumed state."""
    state_dir = os.path.join(args.out_dir, "train_state")
    saved = checkpoint.find_state(state_dir) if args.resume else None
    if args.resume and saved is None:
        raise FileNotFoundError(f"--resume: {os.path.join(state_dir, 'state.json')} does not exist")
    state = read_state(saved, args, given) if saved else None
    if state is not None:
        args = state["args"]
    if not args.ckpt or not args.data:
        raise SystemExit("train.py: pass --ckpt CKPT and --data FILE (or no arguments at all for the demo)")
    log = print if where.master else (lambda *a, **k: None)
    # a resumed run computes in the dtype its start resolved `auto` to
    dtype = cli.resolve_dtype(state.get("dtype", "auto") if state and args.dtype == "auto" else args.dtype,
                              where.device)
    log("options:\n" + "\n".join(f"  --{k} {v}" for k, v in vars(args).items()))
    if where.master:
        os.makedirs(args.out_dir, exist_ok=True)
        for name in os.listdir(args.out_dir):  # what a crash in the middle of a save left behind
            if name.startswith((".tmp-train_state-", ".tmp-export-")):
                shutil.rmtree(os.path.join(args.out_dir, name), ignore_errors=True)

    # The base fingerprint and the data's hash tie a resumed run to what it started from.
    base_fp, data_fp = checkpoint_fingerprint(args.ckpt), data_hash(args.data)
    tokenizer = Tokenizer(args.ckpt, template=args.template or None)
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
    model, file_dtype = load_model(args, where, dtype)
    model = prepare_model(model, args, where, dtype, log)
    if where.fsdp and args.quantize:
        nf4 = [m.storage for m in model.modules() if isinstance(m, quant.NF4Linear)]
        log(f"NF4 base sharded over {where.world} ranks: {sum(p.to_local().nbytes for p in nf4) / 2**20:.2f} "
            f"MiB of {sum(p.nbytes for p in nf4) / 2**20:.2f} MiB on rank 0")
    optimizer, params = make_optimizer(model, args, where)
    rows_per_step = args.batch_size * args.grad_accum_steps * where.world
    total = args.max_iters or max(1, math.ceil(args.epochs * len(data.train_rows) / rows_per_step))
    run = Run(args, where, log, model, model, optimizer, params, data, dtype, tokenizer, file_dtype,
              state_dir, base_fp, data_fp, total)
    if state is not None:
        restore(run, saved, state)
    finish(run)
    start_metrics(run, resumed=state is not None)
    return run


def finish(run):
    """Compile the blocks (--compile) and wrap the model for DDP: what the step then calls."""
    if run.args.compile:
        compile_blocks(run.raw_model)
    if run.dist.ddp and not run.dist.fsdp:
        # no buffer broadcast per step: the buffers (RoPE, an NF4 base) are equal on every rank.
        # torch 2.13 renamed the option (the old name warns); 2.11 and 2.12 know only the old one.
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        run.model = DDP(run.model, device_ids=[run.dist.device] if run.dist.device_type == "cuda" else None,
                        **{no_sync: False})


def read_state(path, args, given):
    """state.json of a resumed run, with "args": the saved options, overridden by those given now.

    An option that changes what is computed must not change, except the split of a step's rows
    between ranks and accumulation: the rows per step must stay the same."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    # options saved under a name or a spelling since renamed (RENAMED, cli.OLD_DTYPE_NAMES)
    dests = {old[2:]: new[2:] for old, new in RENAMED.items()}
    saved = {dests.get(k, k): v for k, v in state["options"].items()}
    saved["dtype"] = cli.OLD_DTYPE_NAMES.get(saved.get("dtype"), saved.get("dtype"))
    if isinstance(saved.get("lora_targets"), str):
        saved["lora_targets"] = cli.comma_list(saved["lora_targets"])
    same = lambda v: json.loads(json.dumps(v))  # noqa: E731  (a tuple given now, a list saved)
    for k in sorted(given - RESUME_MAY_CHANGE):
        if same(getattr(args, k)) != same(saved.get(k)):
            raise ValueError(f"--resume: --{k} is {getattr(args, k)!r} but the run in {path} used "
                             f"{saved.get(k)!r}; an exact resume needs the same value")
    known = vars(build_parser().parse_args([]))
    state["args"] = argparse.Namespace(**{**known, **{k: v for k, v in saved.items() if k in known},
                                          **{k: getattr(args, k) for k in given}, "device": args.device,
                                          "fsdp": args.fsdp})  # how this run is launched decides
    return state


def restore(run, path, state):
    """Load the trainable tensors, the optimizer and the data position of a saved run."""
    if state.get("format", 1) < STATE_FORMAT:  # its fingerprint was computed another way
        run.log(f"--resume: {path} was written before the base fingerprint changed; {run.args.ckpt} is "
                f"taken to be the checkpoint it started from, unchecked")
    elif state["base_fingerprint"] != run.base_fp:
        raise ValueError(f"--resume: {run.args.ckpt} is not the checkpoint the run in {path} started "
                         f"from (fingerprint {run.base_fp[:12]} != {state['base_fingerprint'][:12]})")
    if state["data_hash"] != run.data_fp:
        raise ValueError(f"--resume: {run.args.data} differs from the data the run in {path} read")
    saved_rows = state["rows_per_step"]
    if saved_rows != run.rows_per_step:
        a = run.args
        fix = saved_rows / (a.batch_size * run.dist.world)
        hint = f"--grad_accum_steps {int(fix)}" if fix == int(fix) else "a --grad_accum_steps that gives as many"
        raise ValueError(f"--resume: the run in {path} took {saved_rows} rows per optimizer step, now "
                         f"--batch_size {a.batch_size} x --grad_accum_steps {a.grad_accum_steps} x "
                         f"{run.dist.world} rank{'s' if run.dist.world > 1 else ''} = {run.rows_per_step}; pass {hint}")
    if os.path.isdir(os.path.join(path, checkpoint.SHARDED)):  # written by an FSDP run
        checkpoint.check_trainable(run.raw_model, state["shapes"], path)
        checkpoint.load_sharded(run.raw_model, run.optimizer, path)
    elif run.dist.fsdp:
        checkpoint.load_full_into_sharded(run.raw_model, run.optimizer, path)
    else:
        checkpoint.load_trainable(run.raw_model, os.path.join(path, "trainable.safetensors"))
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
        checkpoint.export(run.raw_model, args.out_dir, run.file_dtype, args.ckpt, run.tokenizer.template,
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
    peak = peak_flops(run.dist.device, run.dtype)
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
    meta = {"format": STATE_FORMAT, "iter": run.it, "data_row": run.data_row, "options": vars(run.args),
            "dtype": cli.DTYPE_NAMES[run.dtype], "base_fingerprint": run.base_fp, "data_hash": run.data_fp,
            "trainable": sorted(shapes), "shapes": shapes, "world_size": run.dist.world,
            "rows_per_step": run.rows_per_step}
    if run.dist.fsdp:
        checkpoint.save_sharded(run.state_dir, run.raw_model, run.optimizer, meta, run.dist.master)
    elif run.dist.master:
        checkpoint.save_state(run.state_dir, run.raw_model, run.optimizer, meta)
    run.last_saved = run.it


# -----------------------------------------------------------------------------
# The built-in demo: `python train.py` with no arguments, a few minutes on 2 CPU cores

DEMO_DIR = "out/demo"
DEMO_COMMON = ["--device", "cpu", "--seq_len", "256", "--batch_size", "8", "--grad_accum_steps", "1", "--beta2", "0.99",
               "--grad_clip", "1.0", "--val_fraction", "0.02", "--save_interval", "0"]


def stage(argv):
    """One training run of the demo; a stop signal ends the whole demo."""
    if train(*parse_args(argv + DEMO_COMMON))["stopped"]:
        sys.exit(PREEMPTED)


def demo():
    """A byte-level tokenizer and a tiny dense base pretrained here on generated text, upcycled to
    PESC and instruction-tuned on generated word questions (skills.py), scored before and after on
    words it was never instructed with."""
    t0 = time.time()
    data_dir, init_dir, base_dir = (os.path.join(DEMO_DIR, d) for d in ("data", "init", "base"))
    print(f"PESC demo: everything goes to {DEMO_DIR}/")
    questions = skills.demo_data(data_dir)

    # 1. A byte-level tokenizer (vocab 512 with Llama 3's specials) and a random tiny model.
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(init_dir)  # dim 64, 2 layers: 158K parameters
    write_byte_tokenizer(os.path.join(init_dir, "tokenizer.model"))
    write_tokenizer_config(init_dir, chat_template="llama3")

    # 2. Pretrain it on plain text: the dense base that PESC starts from.
    print("\n== 1/3: pretraining the dense base on generated text (--mode full) ==")
    stage(["--ckpt", init_dir, "--data", os.path.join(data_dir, "pretrain.json"), "--out_dir", base_dir,
           "--mode", "full", "--max_iters", "2000", "--lr", "5e-3", "--lr_schedule", "cosine", "--min_lr", "5e-4",
           "--warmup_iters", "30", "--eval_interval", "1000", "--log_interval", "200"])
    before = skills.evaluate(base_dir, questions)

    # 3. Upcycle to PESC; train routers, adapters and LoRA (the official recipe's trainable parts).
    print("\n== 2/3: upcycling to PESC and instruction tuning (--mode pesc) ==")
    stage(["--ckpt", base_dir, "--data", os.path.join(data_dir, "sft.json"), "--out_dir", DEMO_DIR,
           "--mode", "pesc", "--num_experts", "4", "--experts_per_token", "2", "--adapter_dim", "32",
           "--adapter_scaling", "1.0", "--adapter_dropout", "0", "--lora_rank", "8", "--lora_alpha", "16",
           "--lora_dropout", "0", "--max_iters", "500", "--lr", "3e-3", "--warmup_iters", "20",
           "--eval_interval", "250", "--log_interval", "50"])
    after = skills.evaluate(DEMO_DIR, questions)

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
        import plan

        check_quantize(args)
        return plan.print_plan(args, pesc_config(args), lora_config(args))
    return train(args, given)


if __name__ == "__main__":
    result = main()
    sys.exit(PREEMPTED if result and result.get("stopped") else 0)
