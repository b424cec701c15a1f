"""
What a training run keeps on disk, and what it hands over at the end.

train_state/ (in out_dir) holds what --resume needs to continue exactly: the trainable tensors
(trainable.safetensors), AdamW's state (optimizer.pt, numbering the tensors as param_group_names
lists them) and state.json (iteration, data position, options, fingerprints of the base and the
data). An FSDP run writes sharded/ instead of the first two (torch.distributed.checkpoint, every
rank its shards); either kind loads into either kind of run, on any number of ranks. A state is
written to a temporary directory and renamed over the old one, so a crash at any moment leaves
the previous state whole (train_state.old between the two renames, which find_state reads).

The export is the standalone checkpoint at the root of out_dir: LoRA merged into the base's own
file values, the base's tokenizer files, tokenizer_config.json, training_args.json.
"""

import json
import os
import shutil
import tempfile
from dataclasses import replace

import torch
import torch.distributed as dist
from safetensors import safe_open

import moe
from files import checkpoint_files, replace_dir, staged_dir, write_checkpoint
from model import Transformer
from tokenizer import tokenizer_files, write_tokenizer_config

SHARDED = "sharded"  # the directory of train_state/ that holds an FSDP run's torch.distributed.checkpoint


def param_group_names(model):
    """Names of the trainable tensors in AdamW's two groups: with weight decay, and without (norms,
    biases). The optimizer's state refers to tensors by their place in these lists."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]


def find_state(state_dir):
    """The complete training state on disk: state_dir, or its `.old` twin when a crash came between
    the two renames of replace_dir; None when there is none."""
    for path in (state_dir, state_dir + ".old"):
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def trainable_state(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_state(path, model, optimizer, meta):
    """Write train_state/ so that a crash at any moment leaves a complete state on disk: a
    temporary directory (state.json last) renamed over the old one (files.staged_dir)."""
    from safetensors.torch import save_file

    reclaim_old_state(path)
    with staged_dir(path) as tmp:
        save_file({n: t.contiguous() for n, t in trainable_state(model).items()},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f, indent=2)


def reclaim_old_state(path):
    """Move path.old back to path when a crash between the two renames left only it."""
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


def export(model, out_dir, dtype, base_dir, template, template_given, options, writer=True):
    """Write the final standalone checkpoint at the root of out_dir, file by file atomically;
    base_dir is the checkpoint the run started from.

    LoRA is merged into the base weights. The tokenizer files of base_dir come along, and
    tokenizer_config.json names the chat template (when there was none, or --template chose it).
    An FSDP model is gathered one tensor at a time, so no rank ever holds the whole model: every
    rank calls this (the gathers are collectives), the one with writer=True writes."""
    from torch.distributed.tensor import DTensor

    # Frozen tensors are copied from base_dir's files: the model held them in the compute dtype
    # (bf16 on GPU), which would round an fp16 or fp32 base. LoRA deltas are added to the file's
    # values in fp32.
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, moe.LoRALinear)}
    config = replace(model.config, lora=None)  # the exported model: LoRA merged, the base in full precision
    with torch.device("meta"):
        keys = list(Transformer(config).state_dict())  # an NF4 model's own state dict lacks its base
    current = model.state_dict()
    base_file = {}
    for fname in checkpoint_files(base_dir):
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
        extra = tokenizer_files(base_dir)
        write_tokenizer_config(stage, base_dir, template, keep_src_template=not template_given)
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
