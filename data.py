"""
The instruction-data pipeline: read data files, tokenize them with a chat template, pack, cache,
batch.

Formats, told apart by the keys of a file's first record:
- PESC/Camelidae JSON: {"corpus", "dataset", "instruction", "conversation": [{"input", "output"}]}.
  A non-empty corpus is plain text trained on whole; otherwise the instruction is the system
  prompt and the conversation the user/assistant turns.
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]} (OpenAI).
- ShareGPT: {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value"}]}.
- Alpaca: {"instruction", "input", "output"}; the input follows the instruction after a blank line.
- pairs: one prompt and one response under the names common sets use (PROMPT_KEYS x
  RESPONSE_KEYS, e.g. query/response, problem/solution, prompt/completion, question/answer),
  with an optional system prompt; `fields=(prompt_key, response_key)` names them when the keys
  alone are ambiguous (or are other names).
Files: a JSON list or JSON lines (.json, .jsonl, optionally gzipped: .gz), or Parquet (.parquet,
read with pyarrow, an optional dependency).

A data spec is one file or a mixture, "a.parquet:0.5,b.jsonl:0.3,c.json:0.2": the weights are
shares of the training rows; bare paths (no weights) keep every row of every file. Each source
is split into training and held-out examples and packed on its own, so a row holds one source's
examples; then source i contributes round(w_i * N) rows (largest remainder; N = all sources'
packed rows), repeating a small source whole and adding a seeded sample of its rows, or taking a
seeded sample of a large one. All of it depends on the seed only, never on the world size.

Every example becomes (inputs, targets) of equal length, at most seq_len: inputs = ids[:-1],
targets = labels[1:], where labels are the token ids on assistant turns (and corpus text) and
-100 everywhere else. Shifting inside each example means no target ever crosses into the next
example of a packed row.

Packing puts several examples in one row of seq_len tokens, and keeps each example to itself
with both tools: a block-diagonal causal mask (no token sees another example) and per-example
RoPE positions restarting at 0 (every example sees exactly the positions it would see alone),
so a packed row gives the same per-example losses as the examples one by one.

The token cache: the tokenized, split, packed and mixed data is a directory of flat numpy arrays
(memory-mapped when read) and header.json, named by a hash of everything it depends on (the
data files, the tokenizer files, the template, seq_len, packing, the mixture, the split, the
seed). It is written under a temporary name and renamed, so a directory with the final name is
complete; one process per machine (local rank 0) builds it, the others wait for that name.
Tokenization runs in a process pool over chunks of records, so memory holds a few chunks, not
the dataset (except a JSON-list file, which is parsed whole).

Order: epoch e reads the training rows in a permutation seeded by (seed, e). All ranks see the
same rows; the training loop reads micro-batch rows [start, start + batch_size) of the endless
stream epoch 0, epoch 1, ..., and gives each (rank, micro-step) its own start, so the rows of an
optimizer step do not depend on how they are spread over ranks and accumulation steps.
"""

import gzip
import hashlib
import json
import math
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from multiprocessing import get_all_start_methods, get_context

import numpy as np
import torch

from files import file_fingerprint, staged_dir

IGNORE_INDEX = -100  # the model's cross_entropy ignores these targets
PROMPT_KEYS = ("query", "problem", "prompt", "question")
RESPONSE_KEYS = ("response", "solution", "completion", "answer")
SYSTEM_KEYS = ("system", "system_prompt")  # an optional system prompt beside a prompt/response pair
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHUNK_RECORDS = 2048  # records per tokenization task: the unit that bounds memory while building
CACHE_VERSION = 1  # bump when the cache layout or what is stored in it changes

# -----------------------------------------------------------------------------
# The data spec


def parse_data_spec(spec):
    """[(path, weight or None), ...] of "a.jsonl:0.5,b.parquet:0.5" or "a.jsonl,b.jsonl" or one path."""
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ValueError(f"--data {spec!r}: an empty source between commas")
        path, weight = part, None
        if ":" in part and not os.path.exists(part):
            path, tail = part.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(f"--data: the weight {tail!r} of {part!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"--data: the weight of {part!r} should be a positive number")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data: {path}: no such data file")
        sources.append((path, weight))
    if len({w is None for _, w in sources}) > 1:
        raise ValueError(f"--data {spec!r}: give every source a weight, or none (then each keeps all its rows)")
    return sources


def data_hash(spec):
    """A hash of what a data spec reads: each source's contents and weight (not its path, which a
    resumed run may move)."""
    parts = [(file_fingerprint(path), weight) for path, weight in parse_data_spec(spec)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# -----------------------------------------------------------------------------
# Reading records


def iter_items(path):
    """(where, item, is_line, fraction read) of a data file's records, streamed where the format
    allows. `item` is a record, or for JSON lines the raw line (parsed by the tokenizing worker).
    `where` names the record in errors: "file:line", "file: record i", "file: row i"."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    size = max(os.path.getsize(path), 1)
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        line_no, first = 0, b""
        try:
            while not first.strip():  # the first non-blank line tells a JSON list from JSON lines
                first = f.readline()
                line_no += 1
                if not first:
                    raise ValueError(f"{path}: the data file is empty")
            if first.lstrip()[:1] == b"[":  # one JSON list: parsed whole
                try:
                    data = json.loads(first + f.read())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{e.lineno + line_no - 1}:{e.colno}: malformed JSON ({e.msg})") from None
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
                if not isinstance(data, list):
                    raise ValueError(f"{path}: expected a JSON list of records")
                for i, record in enumerate(data):
                    yield f"{path}: record {i}", record, False, (i + 1) / len(data)
                return
            line = first
            while line:
                if line.strip():
                    yield f"{path}:{line_no}", line, True, raw.tell() / size
                line = f.readline()
                line_no += 1
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise ValueError(f"{path}: cannot read it ({e})") from None


def _iter_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types; the message says what is wrong
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    n, i = max(f.metadata.num_rows, 1), 0
    for batch in f.iter_batches(batch_size=CHUNK_RECORDS):
        for record in batch.to_pylist():
            yield f"{path}: row {i}", record, False, (i + 1) / n
            i += 1


def parse_item(where, item, is_line):
    """The record of an item of iter_items."""
    if not is_line:
        return item
    try:
        return json.loads(item)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON line ({e.msg}); a data file is a JSON "
                         f"list of records or one JSON record per line") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from None


def record_format(where, record, fields=None):
    """'chat', 'sharegpt', 'pesc', 'alpaca' or 'pairs' from a record's keys."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields is not None and all(k in record for k in fields):
        return "pairs"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record or "corpus" in record:
        return "pesc"
    if "instruction" in record and "output" in record:
        return "alpaca"
    prompts, responses = [k for k in PROMPT_KEYS if k in record], [k for k in RESPONSE_KEYS if k in record]
    if len(prompts) == 1 and len(responses) == 1:
        return "pairs"
    if prompts and responses:
        raise ValueError(f"{where}: ambiguous prompt/response keys (prompt: {prompts}, response: {responses}); "
                         f"choose with --fields PROMPT_KEY,RESPONSE_KEY")
    fields_hint = f"; --fields {','.join(fields)} names keys it does not have" if fields else \
        "; --fields PROMPT_KEY,RESPONSE_KEY names the keys of other prompt/response pairs"
    raise ValueError(f"{where}: not a record of a known format (chat: messages, ShareGPT: conversations, "
                     f"PESC: corpus/instruction/conversation, Alpaca: instruction/input/output, pairs: "
                     f"{'/'.join(PROMPT_KEYS)} with {'/'.join(RESPONSE_KEYS)}); its keys are {sorted(record)}"
                     + fields_hint)


def _str(where, record, key, default=None):
    value = record.get(key, default)
    if value is None and default is None:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} should be a string, got {type(value).__name__}")
    return value


def _list(where, record, key):
    value = record.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} should be a list, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: {key!r} is empty; a conversation needs at least one turn")
    return value


def to_messages(fmt, where, record, fields=None):
    """A record as ("text", str) for plain text, or ("chat", messages)."""
    found = record_format(where, record, fields)
    if found != fmt:
        raise ValueError(f"{where}: a {found} record in a {fmt} file (the first record decides the file's format)")
    if fmt == "chat":
        return "chat", _list(where, record, "messages")
    if fmt == "sharegpt":
        messages = []
        for i, turn in enumerate(_list(where, record, "conversations")):
            at = f"{where}: conversations[{i}]"
            if not isinstance(turn, dict):
                raise ValueError(f"{at}: should be an object with 'from' and 'value'")
            role = _str(at, turn, "from")
            if role not in SHAREGPT_ROLES:
                raise ValueError(f"{at}: unknown role {role!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[role], "content": _str(at, turn, "value")})
        return "chat", messages
    if fmt == "alpaca":
        instruction, extra = _str(where, record, "instruction"), _str(where, record, "input", "")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return "chat", [{"role": "user", "content": user},
                        {"role": "assistant", "content": _str(where, record, "output")}]
    if fmt == "pairs":
        prompt_key, response_key = fields if fields is not None and all(k in record for k in fields) else (
            next(k for k in PROMPT_KEYS if k in record), next(k for k in RESPONSE_KEYS if k in record))
        system = next((_str(where, record, k) for k in SYSTEM_KEYS if record.get(k) is not None), "")
        messages = [{"role": "system", "content": system}] if system else []
        return "chat", messages + [{"role": "user", "content": _str(where, record, prompt_key)},
                                   {"role": "assistant", "content": _str(where, record, response_key)}]
    corpus = _str(where, record, "corpus", "")
    if corpus:
        return "text", corpus
    system = _str(where, record, "instruction", "")
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(_list(where, record, "conversation")):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: conversation[{i}] should be an object with 'input' and 'output'")
        messages.append({"role": "user", "content": _str(f"{where}: conversation[{i}]", turn, "input")})
        messages.append({"role": "assistant", "content": _str(f"{where}: conversation[{i}]", turn, "output")})
    return "chat", messages


# -----------------------------------------------------------------------------
# Tokenizing


def _encode_example(tokenizer, kind, content, template, seq_len, where):
    """(ids, target mask) of one example as the cache stores it: the first seq_len + 1 tokens,
    int32 and bool; None for an example with no assistant turn."""
    if kind == "text":
        ids = tokenizer.encode(content, bos=True, eos=True)
        target_mask = [True] * len(ids)  # all of it; ids[0] is never a target after the shift
    else:
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in content):
            return None  # nothing to learn (e.g. only a user turn)
        try:
            ids, target_mask = tokenizer.encode_chat(content, template)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return (np.asarray(ids[:seq_len + 1], dtype=np.int32), np.asarray(target_mask[:seq_len + 1], dtype=bool))


def tokenize_chunk(tokenizer, template, seq_len, fmt, fields, items):
    """Tokenize a chunk of iter_items' items: {"ids", "mask", "lengths", "targets", "skipped",
    "first_skipped"}, lengths and targets per example.
    Examples with no trainable token are skipped (counted; the first one named)."""
    ids, masks, lengths, targets, skipped, first_skipped = [], [], [], [], 0, None
    for where, item, is_line in items:
        kind, content = to_messages(fmt, where, parse_item(where, item, is_line), fields)
        ex = _encode_example(tokenizer, kind, content, template, seq_len, where)
        if ex is None or not ex[1][1:].any():
            skipped += 1
            first_skipped = first_skipped or where
            continue
        ids.append(ex[0])
        masks.append(ex[1])
        lengths.append(len(ex[0]))
        targets.append(int(ex[1][1:].sum()))
    cat = lambda arrays, dtype: np.concatenate(arrays) if arrays else np.zeros(0, dtype)  # noqa: E731
    return {"ids": cat(ids, np.int32), "mask": cat(masks, bool), "lengths": np.asarray(lengths, dtype=np.int64),
            "targets": np.asarray(targets, dtype=np.int64),
            "skipped": skipped, "first_skipped": first_skipped}


_worker_args = None  # (tokenizer, template, seq_len, fields) of a pool worker, set once per process


def _init_worker(*args):
    global _worker_args
    _worker_args = args


def _pool_task(fmt, items):
    tokenizer, template, seq_len, fields = _worker_args
    return tokenize_chunk(tokenizer, template, seq_len, fmt, fields, items)


def pack(lengths, seq_len):
    """Row boundaries (R + 1 offsets into the examples): fill each row in order until the next
    example does not fit."""
    offsets, used = [0], 0
    for i, n in enumerate(lengths):
        if i > offsets[-1] and used + n > seq_len:
            offsets.append(i)
            used = 0
        used += n
    if len(lengths):
        offsets.append(len(lengths))
    return np.asarray(offsets, dtype=np.int64)


def mixture_rows(rows_per_source, weights, seed):
    """The packed rows each source contributes: weights (or None: every row once) as shares of
    the total; a source repeats whole as often as its share needs, plus a seeded sample."""
    total = sum(rows_per_source)
    if weights is None:
        counts = list(rows_per_source)
    else:  # largest remainder: each count within one row of its exact share
        exact = [w / sum(weights) * total for w in weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[:total - sum(counts)]:
            counts[i] += 1
    chosen = []
    for i, (R, n) in enumerate(zip(rows_per_source, counts)):
        repeats, rest = divmod(n, R)
        sample = np.sort(np.random.default_rng([seed, 2, i]).choice(R, rest, replace=False))
        chosen.append(np.concatenate([np.tile(np.arange(R), repeats), sample]).astype(np.int64))
    return chosen


# -----------------------------------------------------------------------------
# Building the arrays, and the cache that keeps them


def tokenizer_fingerprint(tokenizer):
    """A hash of the files a tokenizer was read from (its config too: it may add tokens)."""
    from tokenizer import tokenizer_files

    path = tokenizer.path
    files = [path] if os.path.isfile(path) else [p for p, _ in tokenizer_files(path)] + \
        [p for p in [os.path.join(path, "tokenizer_config.json")] if os.path.isfile(p)]
    return hashlib.sha256(json.dumps([(os.path.basename(p), file_fingerprint(p)) for p in files]).encode()).hexdigest()


def cache_key(sources, tokenizer, template, seq_len, pack_rows, val_fraction, seed, fields):
    """The name of the cache directory: a hash of everything its arrays depend on."""
    parts = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "template": template,
             "seq_len": seq_len, "pack": bool(pack_rows), "val_fraction": val_fraction, "seed": seed,
             "fields": list(fields) if fields else None,
             # the modification time too: an edit that the sampled fingerprint misses still rebuilds
             "sources": [(file_fingerprint(p), os.stat(p).st_mtime_ns, w) for p, w in sources]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _chunk_results(fmt, items, tokenize, get_pool, workers):
    """(tokenize_chunk's result, records in the chunk, fraction of the file read), in file order.
    With a pool, at most 2 chunks per worker are in flight, which bounds the memory."""
    def chunks():
        while True:
            chunk = list(islice(items, CHUNK_RECORDS))
            if not chunk:
                return
            yield [c[:3] for c in chunk], chunk[-1][3]

    all_chunks = chunks()
    head = list(islice(all_chunks, 2))
    if workers <= 1 or len(head) < 2:  # a single chunk is not worth starting processes for
        for chunk, fraction in chain(head, all_chunks):
            yield tokenize(fmt, chunk), len(chunk), fraction
        return
    pool, pending = get_pool(), deque()
    for chunk, fraction in chain(head, all_chunks):
        pending.append((pool.submit(_pool_task, fmt, chunk), len(chunk), fraction))
        if len(pending) >= 2 * workers:
            future, n, fraction_done = pending.popleft()
            yield future.result(), n, fraction_done
    while pending:
        future, n, fraction_done = pending.popleft()
        yield future.result(), n, fraction_done


def _tokenize_source(path, fields, seq_len, tokenize, get_pool, workers, out, log):
    """Append one source's examples to the open files out["ids"], out["mask"]; returns
    (format, records read, records skipped, per-example stored lengths, per-example targets)."""
    items = iter_items(path)
    first = next(items, None)
    if first is None:
        raise ValueError(f"{path}: the data file holds no records")
    fmt = record_format(first[0], parse_item(*first[:3]), fields)
    records, skipped, first_skipped, lengths, targets = 0, 0, None, [], []
    t0 = t_log = time.time()
    for result, n, fraction in _chunk_results(fmt, chain([first], items), tokenize, get_pool, workers):
        result["ids"].tofile(out["ids"])
        result["mask"].tofile(out["mask"])
        lengths.append(result["lengths"])
        targets.append(result["targets"])
        records += n
        skipped += result["skipped"]
        first_skipped = first_skipped or result["first_skipped"]
        now = time.time()
        if now - t_log >= 10:  # a progress line every 10 s
            rate = records / (now - t0)
            eta = (now - t0) * (1 - fraction) / max(fraction, 1e-9)
            log(f"  tokenizing {path}: {records:,} records, {rate:,.0f} records/s, {100 * fraction:.0f}% read, "
                f"ETA {eta:.0f} s")
            t_log = now
    lengths, targets = np.concatenate(lengths), np.concatenate(targets)
    if time.time() - t0 >= 10:
        log(f"  tokenized {path}: {records:,} records in {time.time() - t0:.0f} s")
    if skipped:
        log(f"warning: {path}: skipped {skipped} of {records} records with no trainable token (no assistant turn, "
            f"or cut off by --seq_len {seq_len}), the first: {first_skipped}")
    if not len(lengths):
        raise ValueError(f"{path}: no record has a trainable token; nothing to train on")
    return fmt, records, skipped, lengths, targets


def build_arrays(directory, sources, tokenizer, template, seq_len, pack_rows, val_fraction, seed, fields,
                 workers, log):
    """Tokenize, split, pack and mix the sources into flat arrays under directory (name.bin);
    returns the header that describes them."""
    def tokenize(fmt, chunk):
        return tokenize_chunk(tokenizer, template, seq_len, fmt, fields, chunk)

    pool = []  # started by the first source that has more than one chunk

    def get_pool():
        if not pool:
            # fork where there is one, as torch's DataLoader does: spawn would re-import torch and the
            # main script in every worker (seconds each); the workers never touch torch or CUDA.
            context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
            pool.append(ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                            initargs=(tokenizer, template, seq_len, fields)))
        return pool[0]

    out = {"ids": open(os.path.join(directory, "ids.bin"), "wb"),
           "mask": open(os.path.join(directory, "mask.bin"), "wb")}
    try:
        read = [_tokenize_source(path, fields, seq_len, tokenize, get_pool, workers, out, log) for path, _ in sources]
    finally:
        out["ids"].close()
        out["mask"].close()
        for p in pool:
            p.shutdown(cancel_futures=True)

    # Per source: a seeded held-out split of whole examples; the rest, in a seeded order, packed.
    lengths = np.concatenate([r[3] for r in read])
    n_inputs = lengths - 1  # stored tokens minus one: the example's length once shifted
    targets = np.concatenate([r[4] for r in read])
    arrays = {k: [] for k in ("train_examples", "train_row_offsets", "val_examples", "val_row_offsets",
                              "val_row_source")}
    first_example, placed, row_tokens, stats = 0, {"train": 0, "val": 0}, [], []
    for i, (fmt, records, skipped, source_lengths, _) in enumerate(read):
        n = len(source_lengths)
        order = np.random.default_rng([seed, 0, i]).permutation(n) + first_example
        n_val = min(max(1, round(val_fraction * n)), n - 1) if val_fraction > 0 and n > 1 else 0
        for part, examples in (("train", order[n_val:]), ("val", np.sort(order[:n_val]))):
            offsets = pack(n_inputs[examples], seq_len) if pack_rows else np.arange(len(examples) + 1)
            arrays[f"{part}_examples"].append(examples)
            arrays[f"{part}_row_offsets"].append(offsets[:-1] + placed[part])
            placed[part] += len(examples)
            if part == "val":
                arrays["val_row_source"].append(np.full(len(offsets) - 1, i, dtype=np.int32))
            else:
                row_tokens.append(np.add.reduceat(n_inputs[examples], offsets[:-1]))
        stats.append({"path": sources[i][0], "weight": sources[i][1], "format": fmt, "records": records,
                      "skipped": skipped, "train_examples": n - n_val, "val_examples": n_val,
                      "train_targets": int(targets[order[n_val:]].sum())})
        first_example += n
    for part in ("train", "val"):
        arrays[f"{part}_row_offsets"].append(np.asarray([placed[part]]))

    # The mixture: which packed training rows (with repeats) make the rows of an epoch.
    rows_per_source = [len(t) for t in row_tokens]
    chosen = mixture_rows(rows_per_source, [w for _, w in sources] if sources[0][1] is not None else None, seed)
    row_base = np.cumsum([0] + rows_per_source)
    for s, rows, tokens in zip(stats, chosen, row_tokens):
        s.update(packed_rows=len(tokens), rows=len(rows), tokens=int(tokens[rows].sum()))
    arrays["train_stream"] = [rows + base for rows, base in zip(chosen, row_base)]
    arrays["example_offsets"] = [np.zeros(1, np.int64), np.cumsum(lengths)]

    dtypes = {"ids": "int32", "mask": "bool", "val_row_source": "int32"}
    described = {"ids": ["int32", int(lengths.sum())], "mask": ["bool", int(lengths.sum())]}
    for name, parts in arrays.items():
        array = np.concatenate(parts).astype(dtypes.get(name, "int64"))
        array.tofile(os.path.join(directory, name + ".bin"))
        described[name] = [str(array.dtype), len(array)]
    return {"version": CACHE_VERSION, "arrays": described, "sources": stats}


def _read_arrays(directory, key=None, in_memory=False):
    """(header, {name: array}) of a built directory, memory-mapped (or read, in_memory=True), or
    (None, why not) when it is missing, for another key, or incomplete."""
    try:
        with open(os.path.join(directory, "header.json")) as f:
            header = json.load(f)
    except FileNotFoundError:
        return None, "no header.json"
    except (OSError, ValueError) as e:
        return None, f"unreadable header.json ({e})"
    if header.get("version") != CACHE_VERSION or (key is not None and header.get("key") != key):
        return None, "built for other data or by another version"
    arrays = {}
    for name, (dtype, n) in header["arrays"].items():
        path = os.path.join(directory, name + ".bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != n * np.dtype(dtype).itemsize:
            return None, f"{name}.bin holds {size} bytes, the header says {n} x {dtype}"
        if n == 0:  # np.memmap cannot map an empty file
            arrays[name] = np.zeros(0, dtype)
        else:
            arrays[name] = np.fromfile(path, dtype) if in_memory else np.memmap(path, dtype, "r", shape=(n,))
    return header, arrays


def load_or_build(build, cache_dir, key, rebuild=False, builder=True, build_id=None, log=print):
    """(header, arrays) of the cache directory cache_dir/key, built by build(directory) -> header
    if missing, incomplete or rebuild is asked for.

    Only the builder (one process per machine) builds; the others wait for the final name,
    which appears complete or not at all. Under a rebuild they wait for the copy whose header
    carries their build_id (the launcher's run id), not the old one."""
    final = os.path.join(cache_dir, key)
    if not builder:
        t0, t_log = time.time(), time.time()
        while True:
            header, arrays = _read_arrays(final, key)
            if header is not None and (not rebuild or header.get("build_id") == build_id):
                return header, arrays
            if time.time() - t_log >= 60:
                log(f"waiting {time.time() - t0:.0f} s for local rank 0 to build the token cache {final}")
                t_log = time.time()
            time.sleep(0.5)
    if not rebuild:
        header, arrays = _read_arrays(final, key)
        if header is not None:
            log(f"token cache: reading {final}")
            return header, arrays
        if os.path.exists(final):
            log(f"token cache: {final} is incomplete ({arrays}); rebuilding it")
    log(f"token cache: building {final}")
    # under a rebuild the old copy is replaced only once the new one is whole; if another process
    # published the same key meanwhile, its copy wins (files.replace_dir)
    with staged_dir(final) as tmp:
        header = {**build(tmp), "key": key, "build_id": build_id}
        with open(os.path.join(tmp, "header.json"), "w") as f:
            json.dump(header, f, indent=1)
    header, arrays = _read_arrays(final, key)
    if header is None:
        raise RuntimeError(f"token cache {final}: just built, but {arrays}")
    return header, arrays


# -----------------------------------------------------------------------------
# Batches


class Examples:
    """A sequence of (inputs, targets) int32 pairs read from the flat token arrays."""

    def __init__(self, ids, mask, offsets, which):
        self.ids, self.mask, self.offsets, self.which = ids, mask, offsets, which

    def __len__(self):
        return len(self.which)

    def __getitem__(self, k):
        g = int(self.which[k])
        start, end = int(self.offsets[g]), int(self.offsets[g + 1])
        ids = np.array(self.ids[start:end])  # a copy: torch wants writable memory
        return ids[:-1], np.where(self.mask[start + 1:end], ids[1:], IGNORE_INDEX).astype(np.int32)


class Rows:
    """A sequence of packed rows: row k is the examples range(offsets[order[k]], offsets[order[k] + 1])."""

    def __init__(self, offsets, order):
        self.offsets, self.order = offsets, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        o = int(self.order[k])
        return range(int(self.offsets[o]), int(self.offsets[o + 1]))

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def collate(examples, pad_id):
    """Stack rows of examples into (idx, targets, doc_ids), each (B, T) with T the longest row.

    examples: a list of rows, each a list of (inputs, targets). doc_ids number the examples of
    a row from 0; padding gets doc id -1, target -100."""
    T = max(sum(len(x) for x, _ in row) for row in examples)
    B = len(examples)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(examples):
        t = 0
        for d, (x, y) in enumerate(row):
            idx[b, t:t + len(x)] = torch.from_numpy(x)
            targets[b, t:t + len(y)] = torch.from_numpy(y)
            doc_ids[b, t:t + len(x)] = d
            t += len(x)
    return idx, targets, doc_ids


def attention_inputs(doc_ids):
    """The model's `positions`, `doc_ids` and `valid` for rows of packed examples.

    doc_ids: (B, T), the example each token belongs to, -1 for padding. positions restart at
    0 with every example; from both the model builds the mask that lets a token see only
    earlier tokens of its own example (model.attention_mask). When every row holds a single
    example (padded on the right), plain causal attention already does that, so only `valid`
    is returned and the model keeps its fast causal path."""
    B, T = doc_ids.shape
    valid = doc_ids >= 0
    starts = torch.ones_like(valid)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if not (starts[:, 1:] & valid[:, 1:]).any():
        return {"valid": valid}
    t = torch.arange(T, device=doc_ids.device)
    positions = t - torch.where(starts, t, 0).cummax(dim=1).values  # (B, T) offset in its example
    return {"positions": positions, "doc_ids": doc_ids, "valid": valid}


class InstructionData:
    """A data spec (one file or a mixture), tokenized, split into training and held-out examples,
    packed into rows and mixed; read from the token cache when cache_dir has it.

    workers: processes that tokenize (1: this one). builder: whether this process may build the
    cache (under torchrun, local rank 0); the others wait for it. build_id: the launcher's run id,
    shared by the processes of one launch, so that under rebuild_cache they wait for the new copy."""

    def __init__(self, spec, tokenizer, seq_len, template=None, pack_rows=True, val_fraction=0.0, seed=0,
                 log=print, fields=None, cache_dir=None, rebuild_cache=False, workers=1, builder=True,
                 build_id=None):
        sources = parse_data_spec(spec)
        template = template or tokenizer.template
        fields = tuple(fields) if fields else None

        def build(directory):
            return build_arrays(directory, sources, tokenizer, template, seq_len, pack_rows, val_fraction, seed,
                                fields, workers, log)

        self.cache_path = None
        if cache_dir is None:  # built in a scratch directory and read into memory
            with tempfile.TemporaryDirectory(prefix="pesc-data-") as tmp:
                header = build(tmp)
                with open(os.path.join(tmp, "header.json"), "w") as f:
                    json.dump(header, f)
                header, a = _read_arrays(tmp, in_memory=True)
        else:
            key = cache_key(sources, tokenizer, template, seq_len, pack_rows, val_fraction, seed, fields)
            header, a = load_or_build(build, cache_dir, key, rebuild_cache, builder, build_id, log)
            self.cache_path = os.path.join(cache_dir, key)
        self.sources = header["sources"]
        self.format = ",".join(dict.fromkeys(s["format"] for s in self.sources))
        self.seq_len, self.seed = seq_len, seed
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        self.train = Examples(a["ids"], a["mask"], a["example_offsets"], a["train_examples"])
        self.val = Examples(a["ids"], a["mask"], a["example_offsets"], a["val_examples"])
        self.train_rows = Rows(a["train_row_offsets"], a["train_stream"])  # the mixture, with repeats
        self.val_rows = Rows(a["val_row_offsets"], np.arange(len(a["val_row_offsets"]) - 1))
        self.val_row_source = a["val_row_source"]
        self._epoch, self._perm = None, None

    def summary(self):
        tokens = sum(s["tokens"] for s in self.sources)
        lines = [f"{self.format} data: {len(self.train_rows)} training rows ({tokens:,} tokens), "
                 f"{len(self.val)} examples held out in {len(self.val_rows)} rows"]
        for s in self.sources:
            weight = "all rows" if s["weight"] is None else f"weight {s['weight']:g}"
            lines.append(f"  {s['path']} ({s['format']}, {weight}): {s['records']:,} records, {s['skipped']:,} "
                         f"skipped, {s['train_examples']:,} training examples in {s['packed_rows']:,} rows -> "
                         f"{s['rows']:,} rows of the mixture ({s['tokens']:,} tokens), {s['val_examples']:,} held out")
        return "\n".join(lines)

    def epoch_order(self, epoch):
        """The seeded permutation of the training rows read in epoch `epoch`."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.train_rows))
        return self._perm

    def train_batch(self, start, batch_size):
        """Rows [start, start + batch_size) of the endless stream epoch 0, epoch 1, ...:
        (idx, targets, model kwargs)."""
        R = len(self.train_rows)
        rows = []
        for i in range(start, start + batch_size):
            row = self.train_rows[self.epoch_order(i // R)[i % R]]
            rows.append([self.train[j] for j in row])
        idx, targets, doc_ids = collate(rows, self.pad_id)
        return idx, targets, attention_inputs(doc_ids)

    def val_batches(self, batch_size, rank=0, world_size=1, source=None):
        """This rank's share of the held-out rows (every world_size-th), in batches; only those
        of source number `source` when given."""
        rows = np.arange(len(self.val_rows)) if source is None else np.flatnonzero(self.val_row_source == source)
        mine = rows[rank::world_size]
        for i in range(0, len(mine), batch_size):
            batch = [[self.val[j] for j in self.val_rows[k]] for k in mine[i:i + batch_size]]
            idx, targets, doc_ids = collate(batch, self.pad_id)
            yield idx, targets, attention_inputs(doc_ids)
