"""
Files on disk: written so that a crash never leaves half of one, and recognised by content.

- write_atomic, staged_dir, replace_dir: a file or a directory appears under its final name
  complete or not at all (a temporary name beside it, then a rename).
- write_checkpoint, checkpoint_files: the checkpoint directory format (config.json, safetensors
  shards with an index above 5 GiB), shared by the project's checkpoints and the HF export.
- safetensors_header, mmap_safetensors: safetensors files read without loading them.
- file_fingerprint, checkpoint_fingerprint: cheap hashes that tie a run to the files it read.

Nothing here knows about models; it imports no other module of the project.
"""

import hashlib
import json
import math
import mmap
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch

# -----------------------------------------------------------------------------
# Atomic writes


def write_atomic(path, data):
    """Write text or bytes to path through a temporary file beside it, renamed when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else
                                                                         {"encoding": "utf-8"})) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def replace_dir(tmp, path):
    """Move the finished directory tmp to path. An old path is replaced only once tmp is complete:
    it is path.old between the two renames (a crash there leaves it for the caller to recover).
    If another process created path meanwhile (a shared cache), its copy stays and tmp goes."""
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
        return
    try:
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(path):
    """Yield a temporary directory beside path to fill; when the block ends it becomes path
    (replace_dir), when the block raises it is removed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------
# Checkpoint directories and safetensors files


def checkpoint_files(path) -> list:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not os.path.isfile(os.path.join(path, fname)):
                raise FileNotFoundError(f"{index}: shard {fname} is missing")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def write_checkpoint(path, config: dict, state, max_shard_bytes: int = 5 * 2**30, extra_files=(),
                     overwrite: bool = True):
    """Atomically write a checkpoint directory: config.json, safetensors shards, extra files.

    `state` is a dict or any iterable of (name, tensor) pairs, consumed in order, so a generator
    streams tensors in one at a time: memory holds one shard, not the model. extra_files are
    (source path, name) pairs copied in, e.g. the tokenizer."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists")
    with staged_dir(path) as tmp:
        written, current, size = [], {}, 0  # written: (temp file name, {key: nbytes})

        def flush():  # shards get their final "-of-N" names once N is known
            name = f"shard-{len(written):05d}.tmp"
            save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
            written.append((name, {k: t.numel() * t.element_size() for k, t in current.items()}))

        for k, t in state.items() if isinstance(state, dict) else state:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[k], size = t, size + nbytes
        flush()
        current = None
        if len(written) == 1:
            os.rename(os.path.join(tmp, written[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map, total = {}, 0
            for i, (tmp_name, sizes) in enumerate(written):
                name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                os.rename(os.path.join(tmp, tmp_name), os.path.join(tmp, name))
                for k, nbytes in sizes.items():
                    weight_map[k] = name
                    total += nbytes
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for src, name in extra_files:
            shutil.copyfile(src, os.path.join(tmp, name))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(f, fname):
    """(header length, header dict) of an open safetensors file: 8 bytes of length, then JSON."""
    n = int.from_bytes(f.read(8), "little")
    try:
        return n, json.loads(f.read(n))
    except ValueError as e:
        raise ValueError(f"{fname}: the safetensors header is not JSON ({e})") from None


def mmap_safetensors(fname) -> dict:
    """The tensors of a safetensors file, each a view of its own private memory map of the file
    (copy on write: writing to one never changes the file). Pages are read when first touched and
    leave the process's memory when the tensor is freed, so a caller that copies out a part of
    each tensor and drops it never holds more of the file than one tensor."""
    out = {}
    with open(fname, "rb") as f:
        n, header = safetensors_header(f, fname)
        size = os.path.getsize(fname)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise ValueError(f"{fname}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
            dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            numel = math.prod(info["shape"])
            if end - start != numel * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{fname}: tensor {key!r} has data_offsets {info['data_offsets']} that do not "
                                 f"fit its shape {info['shape']} and dtype {info['dtype']} or the file")
            if numel == 0:
                out[key] = torch.empty(info["shape"], dtype=dtype)
                continue
            first = (8 + n + start) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            buf = mmap.mmap(f.fileno(), 8 + n + end - first, access=mmap.ACCESS_COPY, offset=first)
            out[key] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + start - first).view(info["shape"])
    return out


# -----------------------------------------------------------------------------
# Fingerprints


def file_fingerprint(path):
    """A hash of a file's size and contents: all of it up to 4 MiB, else 64 slices of 64 KiB spread
    over it (always the first and the last), so that a 10 GB file is fingerprinted in
    milliseconds. An edit that keeps the size and misses every slice goes unnoticed."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 64 * 65536:
            h.update(f.read())
        else:
            for i in range(64):
                f.seek((size - 65536) * i // 63)
                h.update(f.read(65536))
    return h.hexdigest()


def checkpoint_fingerprint(ckpt_dir):
    """A hash of a checkpoint directory: config.json and each weight file, by file_fingerprint.
    Two fine-tunes of one architecture differ in the sampled bytes."""
    files = [os.path.join(ckpt_dir, "config.json")] + checkpoint_files(ckpt_dir)
    parts = [(os.path.basename(f), file_fingerprint(f)) for f in files]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
