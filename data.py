"""
The instruction-data pipeline: read a data file, tokenize it with a chat template, pack, batch.

Three formats, told apart by the content of the first record:
- PESC/Camelidae JSON: a list of {"corpus", "dataset", "instruction", "conversation": [{"input",
  "output"}, ...]}. A non-empty corpus is plain text trained on whole; otherwise the instruction
  is the system prompt and the conversation the user/assistant turns.
- Alpaca JSON: a list of {"instruction", "input", "output"}; the user turn is the instruction,
  followed by the input after a blank line when there is one.
- Chat JSONL: one {"messages": [{"role", "content"}, ...]} per line.
A file is either one JSON list or JSON lines; any of the three record kinds may come in either.

Every example becomes (inputs, targets) of equal length, at most seq_len: inputs = ids[:-1],
targets = labels[1:], where labels are the token ids on assistant turns (and corpus text) and
-100 everywhere else. Shifting inside each example means no target ever crosses into the next
example of a packed row.

Packing puts several examples in one row of seq_len tokens, and keeps each example to itself
with both tools: a block-diagonal causal mask (no token sees another example) and per-example
RoPE positions restarting at 0 (every example sees exactly the positions it would see alone),
so a packed row gives the same per-example losses as the examples one by one.

Order: the held-out split and the packing are fixed by the seed; then epoch e reads the rows in
a permutation seeded by (seed, e). All ranks compute the same rows; the training loop reads
micro-batch rows [start, start + batch_size) of the endless stream epoch 0, epoch 1, ..., and
gives each (rank, micro-step) its own start, so the rows of an optimizer step do not depend on
how they are spread over ranks and accumulation steps.
"""

import json

import numpy as np
import torch

IGNORE_INDEX = -100  # the model's cross_entropy ignores these targets

# -----------------------------------------------------------------------------
# Reading records


def read_records(path):
    """(format, [(where, record), ...]) of a data file; format is 'pesc', 'alpaca' or 'chat'.

    `where` names the record in error messages: "file: record i" in a JSON list, "file:line"
    in JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the data file is empty")
    if text.lstrip()[0] == "[":  # one JSON list of records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
        records = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    else:  # JSON lines
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON line ({e.msg}); a data file is a JSON "
                                 f"list of records or one JSON record per line") from None
    if not records:
        raise ValueError(f"{path}: the data file holds no records")
    return record_format(*records[0]), records


def record_format(where, record):
    """'pesc', 'alpaca' or 'chat' from a record's keys."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat"
    if "conversation" in record or "corpus" in record:
        return "pesc"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise ValueError(f"{where}: not a record of a known format (PESC: corpus/instruction/conversation, "
                     f"Alpaca: instruction/input/output, chat: messages); its keys are {sorted(record)}")


def _str(where, record, key, default=None):
    value = record.get(key, default)
    if value is None and default is None:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} should be a string, got {type(value).__name__}")
    return value


def to_messages(fmt, where, record):
    """A record as ("text", str) for plain text, or ("chat", messages)."""
    if record_format(where, record) != fmt:
        raise ValueError(f"{where}: a {record_format(where, record)} record in a {fmt} file "
                         f"(the first record decides the file's format)")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: 'messages' should be a list, got {type(messages).__name__}")
        return "chat", messages
    if fmt == "alpaca":
        instruction, extra = _str(where, record, "instruction"), _str(where, record, "input", "")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return "chat", [{"role": "user", "content": user},
                        {"role": "assistant", "content": _str(where, record, "output")}]
    corpus = _str(where, record, "corpus", "")
    if corpus:
        return "text", corpus
    system = _str(where, record, "instruction", "")
    turns = record.get("conversation", [])
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversation' should be a list, got {type(turns).__name__}")
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: conversation[{i}] should be an object with 'input' and 'output'")
        messages.append({"role": "user", "content": _str(f"{where}: conversation[{i}]", turn, "input")})
        messages.append({"role": "assistant", "content": _str(f"{where}: conversation[{i}]", turn, "output")})
    return "chat", messages


# -----------------------------------------------------------------------------
# Tokenizing


def tokenize_example(tokenizer, kind, content, template, seq_len, where="example"):
    """(inputs, targets) int32 arrays of one example, shifted for next-token prediction and cut
    to seq_len; targets are -100 outside assistant turns. None for an example with no turns."""
    if kind == "text":
        ids = tokenizer.encode(content, bos=True, eos=True)
        target_mask = [True] * len(ids)  # all of it; ids[0] is never a target after the shift
    else:
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in content):
            return None  # nothing to learn (e.g. an empty conversation)
        try:
            ids, target_mask = tokenizer.encode_chat(content, template)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, target_mask)]
    inputs = np.asarray(ids[:-1][:seq_len], dtype=np.int32)
    targets = np.asarray(labels[1:][:seq_len], dtype=np.int32)
    return inputs, targets


def pack(lengths, seq_len):
    """Rows of example indices, filled in order until the next example does not fit."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Batches


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
    """One data file, tokenized, split into training and held-out examples, packed into rows."""

    def __init__(self, path, tokenizer, seq_len, template=None, pack_rows=True, val_fraction=0.0,
                 seed=0, log=print):
        fmt, records = read_records(path)
        self.format, self.seq_len = fmt, seq_len
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        # Convert and tokenize everything first, so that bad data stops the run before training.
        examples, skipped = [], []
        for where, record in records:
            kind, content = to_messages(fmt, where, record)
            ex = tokenize_example(tokenizer, kind, content, template, seq_len, where)
            if ex is None or not (ex[1] != IGNORE_INDEX).any():
                skipped.append(where)
                continue
            examples.append(ex)
        if skipped:
            log(f"warning: {path}: skipped {len(skipped)} of {len(records)} records with no trainable token "
                f"(no assistant turn, or cut off by --seq_len {seq_len}), the first: {skipped[0]}")
        if not examples:
            raise ValueError(f"{path}: no record has a trainable token; nothing to train on")

        # Held-out split of whole examples; the rest, in a seeded order, is packed once.
        order = np.random.default_rng([seed, 0]).permutation(len(examples))
        n_val = 0
        if val_fraction > 0 and len(examples) > 1:
            n_val = min(max(1, round(val_fraction * len(examples))), len(examples) - 1)
        self.val = [examples[i] for i in sorted(order[:n_val])]
        self.train = [examples[i] for i in order[n_val:]]

        def make_rows(exs):
            if pack_rows:
                return pack([len(x) for x, _ in exs], seq_len)
            return [[i] for i in range(len(exs))]

        self.train_rows, self.val_rows = make_rows(self.train), make_rows(self.val)
        self.seed = seed
        self._epoch, self._perm = None, None

    def summary(self):
        tokens = sum(len(x) for x, _ in self.train)
        targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in self.train)
        return (f"{self.format} data: {len(self.train)} training examples in {len(self.train_rows)} rows "
                f"({tokens:,} tokens, {targets:,} targets), {len(self.val)} held out")

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

    def val_batches(self, batch_size, rank=0, world_size=1):
        """This rank's share of the held-out rows (every world_size-th), in batches."""
        mine = self.val_rows[rank::world_size]
        for i in range(0, len(mine), batch_size):
            rows = [[self.val[j] for j in row] for row in mine[i:i + batch_size]]
            idx, targets, doc_ids = collate(rows, self.pad_id)
            yield idx, targets, attention_inputs(doc_ids)
