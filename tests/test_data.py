"""data.py: formats, loss masks for every template, packing, order and sharding, bad data."""

import gzip
import json
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data as data_module
from data import IGNORE_INDEX, InstructionData, attention_inputs, collate, data_hash
from model import ModelConfig, Transformer, attention_mask
from moe import PESCConfig, upcycle
from tokenizer import Tokenizer, byte_to_unicode, write_byte_tokenizer
from tolerance import assert_close, tolerance

SYSTEM = "Be brief."
TURNS = [("Name a colour.", "Blue."), ("And another?", "Green, or red.")]


def write(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    """The byte-level tiktoken tokenizer (Llama 3 specials): llama3, camelidae, llama2 templates."""
    d = tmp_path_factory.mktemp("byte")
    write_byte_tokenizer(str(d / "tokenizer.model"))
    return str(d)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE with no merges: Qwen's specials follow the 256 bytes, for ChatML."""
    d = tmp_path_factory.mktemp("bpe")
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({c: b for b, c in byte_to_unicode().items()}, f)
    with open(d / "merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    return str(d)


# The same conversation (system prompt + two turns) in each of the three formats.
def pesc_records():
    return [{"corpus": "", "dataset": "t", "instruction": SYSTEM,
             "conversation": [{"input": u, "output": a} for u, a in TURNS]}]


def chat_records():
    messages = [{"role": "system", "content": SYSTEM}]
    for u, a in TURNS:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return [{"messages": messages}]


def alpaca_records():
    return [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Translate.", "input": "rouge", "output": "red"}]


def target_runs(inputs, targets):
    """The runs of consecutive target ids, after undoing the shift (targets[t] is token t+1)."""
    runs, run = [], []
    for t in range(len(targets)):
        if targets[t] != IGNORE_INDEX:
            run.append(int(targets[t]))
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


CASES = [(fmt, template) for fmt in ("pesc", "chat", "alpaca")
         for template in ("llama3", "camelidae", "llama2", "chatml")]


@pytest.mark.parametrize("fmt,template", CASES)
def test_loss_mask_is_exactly_the_assistant_turns(tmp_path, byte_dir, bpe_dir, fmt, template):
    tok = Tokenizer(bpe_dir if template == "chatml" else byte_dir)
    records = {"pesc": pesc_records, "chat": chat_records, "alpaca": alpaca_records}[fmt]()
    path = write(tmp_path / "d.json", records, jsonl=fmt == "chat")
    data = InstructionData(path, tok, seq_len=512, template=template, pack_rows=False)
    assert data.format == fmt and len(data.train) == len(records) and len(data.val) == 0
    ends = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(template, "<|end_of_text|>")
    if fmt == "alpaca":
        answers = [["Blue."], ["red"]]
    else:
        answers = [[a for _, a in TURNS]]
    for (inputs, targets), expected in zip(data.train, answers):
        assert len(inputs) == len(targets)
        # the shift: every target is the next input token
        for t in range(len(targets) - 1):
            if targets[t] != IGNORE_INDEX:
                assert targets[t] == inputs[t + 1]
        runs = target_runs(inputs, targets)
        # one run per assistant turn: its answer (llama2 wraps it in spaces) and the turn's end token
        assert len(runs) == len(expected)
        for run, answer in zip(runs, expected):
            assert run[-1] == tok.special_id(ends)
            assert tok.decode(run[:-1]).strip() == answer
            assert not any(t in tok.stop_ids for t in run[:-1])
        # nothing of the prompt side is a target: the system prompt and user turns never show up
        text = tok.decode([t for t in targets if t != IGNORE_INDEX])
        assert SYSTEM not in text and "Name a colour" not in text


def test_alpaca_input_follows_the_instruction(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    data = InstructionData(write(tmp_path / "a.json", alpaca_records()[1:]), tok, 512, "llama3", pack_rows=False)
    inputs, _ = data.train[0]
    assert "Translate.\n\nrouge" in tok.decode(inputs)


def test_corpus_text_is_trained_whole(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    text = "Plain text, every token of it a target."
    records = [{"corpus": text, "dataset": "t", "instruction": "", "conversation": []}]
    data = InstructionData(write(tmp_path / "c.json", records), tok, 512, "llama3", pack_rows=False)
    inputs, targets = data.train[0]
    assert (targets != IGNORE_INDEX).all()
    assert tok.decode(inputs) == "<|begin_of_text|>" + text
    assert tok.decode(targets) == text + "<|end_of_text|>"


def test_truncation_to_seq_len(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    records = [{"corpus": "x" * 100, "dataset": "t", "instruction": "", "conversation": []}]
    data = InstructionData(write(tmp_path / "c.json", records), tok, seq_len=40, template="llama3")
    assert [len(x) for x, _ in data.train] == [40]


# -----------------------------------------------------------------------------
# Packing


def test_attention_inputs_by_hand():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    kw = attention_inputs(doc_ids)
    assert kw["positions"].tolist() == [[0, 1, 0, 1, 2, 0]]
    assert kw["valid"].tolist() == [[True] * 5 + [False]]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (5, 5)]:
        expected[q, k] = True
    mask = attention_mask(kw["positions"], kw["positions"], kw["doc_ids"], kw["doc_ids"])  # what the model builds
    assert torch.equal(mask[0], expected)
    # one example per row (padding on the right): plain causal attention, only `valid`
    kw = attention_inputs(torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]]))
    assert set(kw) == {"valid"} and kw["valid"].tolist() == [[True, True, True, False], [True] * 4]


def per_token_loss(model, idx, targets, **kw):
    logits, _ = model(idx, **kw)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)


def test_packed_row_gives_the_losses_of_the_examples_alone(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    records = [{"messages": [{"role": "user", "content": "q" * (3 + 7 * i)},
                             {"role": "assistant", "content": "a" * (2 + i)}]} for i in range(6)]
    data = InstructionData(write(tmp_path / "d.jsonl", records, jsonl=True), tok, seq_len=160, template="llama3")
    row = max(data.train_rows, key=len)
    assert len(row) >= 3, "the test needs a row that packs several examples"
    examples = [data.train[i] for i in row]

    torch.manual_seed(0)
    model = upcycle(Transformer(ModelConfig.from_preset("tiny")),
                    PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0))
    with torch.no_grad():  # U_e = 0 at upcycling; give the experts (and so the routing) a real effect
        for layer in model.layers:
            layer.feed_forward.adapter_up.normal_(0, 0.5)
    model.eval()

    idx, targets, doc_ids = collate([examples], tok.pad_id)
    kw = attention_inputs(doc_ids)
    with torch.no_grad():
        packed = per_token_loss(model, idx, targets, **kw)[0]
        unmasked = per_token_loss(model, idx, targets)[0]  # plain causal: examples see each other
        start = 0
        # fp32; only the summation order inside attention and matmuls differs. A whole model's
        # reduction (tolerance.py): the FFN's dot once per layer, and the log-sum-exp over the vocab
        c = model.config
        reduction = c.ffn_dim * c.n_layers + c.vocab_size
        for x, y in examples:
            alone = per_token_loss(model, torch.from_numpy(x).long()[None], torch.from_numpy(y).long()[None])[0]
            assert_close(packed[start:start + len(x)], alone, reduction=reduction)
            start += len(x)
    later = doc_ids[0] > 0
    assert (unmasked[later] - packed[later]).abs().max() > 100 * tolerance(packed, reduction=reduction), \
        "the mask should matter"


def test_padding_mode_one_example_per_row(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    path = write(tmp_path / "d.jsonl", chat_records() * 5, jsonl=True)
    data = InstructionData(path, tok, seq_len=512, template="llama3", pack_rows=False)
    assert all(len(r) == 1 for r in data.train_rows)
    packed = InstructionData(path, tok, seq_len=512, template="llama3", pack_rows=True)
    assert len(packed.train_rows) < len(data.train_rows)
    idx, targets, kw = data.train_batch(0, 2)
    assert set(kw) == {"valid"} and idx.shape[0] == 2


# -----------------------------------------------------------------------------
# Order, epochs, held-out split


def numbered_data(tmp_path, byte_dir, n=20, **kw):
    records = [{"messages": [{"role": "user", "content": f"#{i}"}, {"role": "assistant", "content": f"{i}"}]}
               for i in range(n)]
    return InstructionData(write(tmp_path / "n.jsonl", records, jsonl=True), Tokenizer(byte_dir), template="llama3",
                           **{"seq_len": 64, "pack_rows": False, **kw})


def row_keys(data, start, count):
    """A key per row of the stream: its input ids."""
    idx, _, _ = data.train_batch(start, count)
    return [tuple(r.tolist()) for r in idx]


def test_order_is_seeded_and_epochs_are_permutations(tmp_path, byte_dir):
    a = numbered_data(tmp_path, byte_dir, seed=1)
    b = numbered_data(tmp_path, byte_dir, seed=1)
    c = numbered_data(tmp_path, byte_dir, seed=2)
    R = len(a.train_rows)
    assert row_keys(a, 0, 2 * R) == row_keys(b, 0, 2 * R)
    assert row_keys(a, 0, R) != row_keys(c, 0, R)
    epoch0, epoch1 = row_keys(a, 0, R), row_keys(a, R, R)
    assert len(set(epoch0)) == R and set(epoch0) == set(epoch1) and epoch0 != epoch1
    # a micro-batch across the epoch boundary is the end of one epoch and the start of the next
    assert row_keys(a, R - 2, 4) == epoch0[-2:] + epoch1[:2]


def test_val_split(tmp_path, byte_dir):
    a = numbered_data(tmp_path, byte_dir, n=40, val_fraction=0.1, seed=3)
    assert len(a.val) == 4 and len(a.train) == 36
    train_keys = {tuple(x.tolist()) for x, _ in a.train}
    assert not train_keys & {tuple(x.tolist()) for x, _ in a.val}
    b = numbered_data(tmp_path, byte_dir, n=40, val_fraction=0.1, seed=3)
    assert [x.tolist() for x, _ in a.val] == [x.tolist() for x, _ in b.val]
    rows = [r for rank in range(3) for batch in a.val_batches(1, rank, 3) for r in batch[0].tolist()]
    assert len(rows) == len(a.val_rows)  # the ranks' shares cover the held-out rows once


# -----------------------------------------------------------------------------
# Bad data


def test_malformed_json_line_names_the_line(tmp_path, byte_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat_records()[0]) + "\n" + '{"messages": [}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON line"):
        InstructionData(str(path), Tokenizer(byte_dir), 64, "llama3")


def test_malformed_json_list_names_line_and_column(tmp_path, byte_dir):
    path = tmp_path / "bad.json"
    path.write_text('\n[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"bad.json:4:\d+: malformed JSON"):  # the file's line, blank lines counted
        InstructionData(str(path), Tokenizer(byte_dir), 64, "llama3")


@pytest.mark.parametrize("records,match", [
    ([{"instruction": "a", "output": "b"}, ["not", "an", "object"]], r"record 1: expected a JSON object"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}],
     r"record 1: 'output' should be a string"),
    ([{"instruction": "a", "output": "b"}, {"messages": []}], r"record 1: a chat record in a alpaca file"),
    ([{"question": "a"}], r"record 0: not a record of a known format"),
    (pesc_records() + [{"corpus": "", "conversation": [{"input": "u"}]}],
     r"record 1: conversation\[0\]: missing key 'output'"),
])
def test_malformed_records_name_the_record(tmp_path, byte_dir, records, match):
    with pytest.raises(ValueError, match=match):
        InstructionData(write(tmp_path / "bad.json", records), Tokenizer(byte_dir), 64, "llama3")


def test_bad_roles_name_the_line(tmp_path, byte_dir):
    bad = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    records = chat_records() + [bad]
    with pytest.raises(ValueError, match=r"bad.jsonl:2: message 0"):
        InstructionData(write(tmp_path / "bad.jsonl", records, jsonl=True), Tokenizer(byte_dir), 64, "llama3")


def test_records_without_targets_are_counted_and_skipped_with_one_warning(tmp_path, byte_dir):
    records = chat_records() + [{"messages": [{"role": "user", "content": "no answer"}]}] * 2 + chat_records()
    messages = []
    data = InstructionData(write(tmp_path / "d.jsonl", records, jsonl=True), Tokenizer(byte_dir), 512, "llama3",
                           log=messages.append)
    assert len(data.train) == 2  # the warning counts the skipped ones
    assert len(messages) == 1 and "skipped 2 of 4" in messages[0] and "d.jsonl:2" in messages[0]
    # an answer cut off entirely by --seq_len leaves nothing to learn either
    with pytest.raises(ValueError, match=r"no record has a trainable token"):
        InstructionData(write(tmp_path / "e.jsonl", chat_records(), jsonl=True), Tokenizer(byte_dir), 10, "llama3",
                        log=messages.append)
    assert "cut off by --seq_len 10" in messages[-1]


def test_empty_dataset_is_an_error(tmp_path, byte_dir):
    tok = Tokenizer(byte_dir)
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty.json: the data file is empty"):
        InstructionData(str(tmp_path / "empty.json"), tok, 64, "llama3")
    with pytest.raises(ValueError, match=r"list.json: the data file holds no records"):
        InstructionData(write(tmp_path / "list.json", []), tok, 64, "llama3")
    no_answers = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match=r"no record has a trainable token"):
        InstructionData(write(tmp_path / "q.jsonl", no_answers, jsonl=True), tok, 64, "llama3", log=lambda m: None)


# -----------------------------------------------------------------------------
# Formats that datasets ship in: each the same example as the equivalent `messages` record


def examples(path, byte_dir, **kw):
    data = InstructionData(str(path), Tokenizer(byte_dir), **{"seq_len": 512, "template": "llama3",
                                                              "pack_rows": False, **kw})
    return [data.train[i] for i in range(len(data.train))]


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def sharegpt_records(system_role="system", user_role="human", assistant_role="gpt"):
    turns = [{"from": system_role, "value": SYSTEM}]
    for u, a in TURNS:
        turns += [{"from": user_role, "value": u}, {"from": assistant_role, "value": a}]
    return [{"conversations": turns, "id": "x1"}]  # extra keys, as real sets carry, are ignored


@pytest.mark.parametrize("roles", [("system", "human", "gpt"), ("system", "user", "assistant")])
@pytest.mark.parametrize("template", ["llama3", "camelidae", "chatml"])
def test_sharegpt_equals_messages(tmp_path, byte_dir, bpe_dir, roles, template):
    tok_dir = bpe_dir if template == "chatml" else byte_dir
    kw = dict(template=template)
    expected = examples(write(tmp_path / "m.jsonl", chat_records(), jsonl=True), tok_dir, **kw)
    got = examples(write(tmp_path / "s.jsonl", sharegpt_records(*roles), jsonl=True), tok_dir, **kw)
    assert_same_examples(got, expected)
    assert (expected[0][1] != IGNORE_INDEX).any()


def one_turn_messages(user, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("prompt_key,response_key", [("query", "response"), ("problem", "solution"),
                                                     ("prompt", "completion"), ("question", "answer")])
def test_prompt_response_pairs_equal_messages(tmp_path, byte_dir, prompt_key, response_key):
    records = [{prompt_key: "What is 2+2?", response_key: "4", "source": "math"},
               {prompt_key: "Capital of France?", response_key: "Paris.", "system_prompt": SYSTEM}]
    expected = [one_turn_messages("What is 2+2?", "4"), one_turn_messages("Capital of France?", "Paris.", SYSTEM)]
    got = examples(write(tmp_path / "p.jsonl", records, jsonl=True), byte_dir)
    assert_same_examples(got, examples(write(tmp_path / "m.jsonl", expected, jsonl=True), byte_dir))


def test_fields_choose_between_ambiguous_keys(tmp_path, byte_dir):
    # both question/answer and problem/solution: the keys alone cannot say which pair to train on
    records = [{"question": "Q?", "answer": "short", "problem": "P?", "solution": "long"}]
    path = write(tmp_path / "amb.jsonl", records, jsonl=True)
    with pytest.raises(ValueError, match=r"amb.jsonl:1: ambiguous prompt/response keys .*--fields"):
        examples(path, byte_dir)
    expected = examples(write(tmp_path / "m.jsonl", [one_turn_messages("P?", "long")], jsonl=True), byte_dir)
    assert_same_examples(examples(path, byte_dir, fields=("problem", "solution")), expected)
    # and names keys no preset knows
    other = write(tmp_path / "o.jsonl", [{"instruction": "P?", "target": "long"}], jsonl=True)
    assert_same_examples(examples(other, byte_dir, fields=("instruction", "target")), expected)
    with pytest.raises(ValueError, match=r"o.jsonl:1: not a record of a known format.*--fields"):
        examples(other, byte_dir)


def test_alpaca_and_pesc_equal_messages(tmp_path, byte_dir):
    expected = examples(write(tmp_path / "m.jsonl", chat_records(), jsonl=True), byte_dir)
    assert_same_examples(examples(write(tmp_path / "p.json", pesc_records()), byte_dir), expected)
    alpaca = [{"instruction": "Translate.", "input": "rouge", "output": "red"}]
    assert_same_examples(examples(write(tmp_path / "a.json", alpaca), byte_dir),
                         examples(write(tmp_path / "am.jsonl", [one_turn_messages("Translate.\n\nrouge", "red")],
                                        jsonl=True), byte_dir))


def numbered_chat(n, prefix="#"):
    return [one_turn_messages(f"{prefix}{i}?", f"{i}" * (1 + i % 3)) for i in range(n)]


def test_gzip_and_parquet_equal_jsonl(tmp_path, byte_dir):
    import pyarrow as pa  # a dev requirement: CI has it, so this test never skips
    import pyarrow.parquet as pq

    records = numbered_chat(30) + sharegpt_records()[:0]
    jsonl = write(tmp_path / "d.jsonl", records, jsonl=True)
    expected = examples(jsonl, byte_dir, val_fraction=0.1)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert_same_examples(examples(tmp_path / "d.jsonl.gz", byte_dir, val_fraction=0.1), expected)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=7)
    assert_same_examples(examples(tmp_path / "d.parquet", byte_dir, val_fraction=0.1), expected)
    # ShareGPT in Parquet, as the hub ships it (a list of structs)
    pq.write_table(pa.Table.from_pylist(sharegpt_records() * 3), tmp_path / "s.parquet")
    assert_same_examples(examples(tmp_path / "s.parquet", byte_dir),
                         examples(write(tmp_path / "m.jsonl", chat_records() * 3, jsonl=True), byte_dir))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, byte_dir, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet now fails
    with pytest.raises(ImportError, match=r"d.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
        examples(tmp_path / "d.parquet", byte_dir)


def test_process_pool_equals_one_process(tmp_path, byte_dir, monkeypatch):
    monkeypatch.setattr(data_module, "CHUNK_RECORDS", 8)  # 60 records: 8 chunks over 2 workers
    path = write(tmp_path / "d.jsonl", numbered_chat(60), jsonl=True)
    one = InstructionData(path, Tokenizer(byte_dir), 64, "llama3", val_fraction=0.1, workers=1)
    two = InstructionData(path, Tokenizer(byte_dir), 64, "llama3", val_fraction=0.1, workers=2)
    assert_same_data(one, two)
    bad = write(tmp_path / "bad.jsonl", numbered_chat(30) + [{"messages": [{"role": "robot", "content": "x"},
                                                                {"role": "assistant", "content": "y"}]}],
                jsonl=True)
    with pytest.raises(ValueError, match=r"bad.jsonl:31: message 0"):  # an error in a worker names the line
        InstructionData(bad, Tokenizer(byte_dir), 64, "llama3", workers=2)


# -----------------------------------------------------------------------------
# Mixtures


def assert_same_data(a, b):
    assert_same_examples([a.train[i] for i in range(len(a.train))], [b.train[i] for i in range(len(b.train))])
    assert_same_examples([a.val[i] for i in range(len(a.val))], [b.val[i] for i in range(len(b.val))])
    assert list(a.train_rows) == list(b.train_rows) and list(a.val_rows) == list(b.val_rows)
    assert a.sources == b.sources


def mixture_files(tmp_path):
    sizes = {"A": 50, "B": 13, "C": 7}
    return {p: write(tmp_path / f"{p}.jsonl", numbered_chat(n, prefix=f"src{p}-"), jsonl=True)
            for p, n in sizes.items()}


def rows_by_source(data, tok):
    counts = {}
    for row in data.train_rows:
        (inputs, _), = [data.train[j] for j in row]
        name = tok.decode(inputs.tolist()).split("src")[1][0]
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1, 1, 1), (0.1, 0.1, 5)])
def test_mixture_rows_match_the_weights(tmp_path, byte_dir, weights):
    files = mixture_files(tmp_path)
    spec = ",".join(f"{path}:{w}" for path, w in zip(files.values(), weights))
    tok = Tokenizer(byte_dir)
    data = InstructionData(spec, tok, 64, "llama3", pack_rows=False, val_fraction=0.1, seed=5)
    N = len(data.train_rows)
    assert N == sum(s["train_examples"] for s in data.sources)  # the epoch keeps the sources' total
    counts = rows_by_source(data, tok)
    for name, w in zip(files, weights):
        assert abs(counts[name] - w / sum(weights) * N) <= 1, (counts, weights)
    assert [s["rows"] for s in data.sources] == [counts[n] for n in files]
    # the same seed, the same mixture (a resumed run, every rank); another seed samples other rows
    again = InstructionData(spec, tok, 64, "llama3", pack_rows=False, val_fraction=0.1, seed=5)
    assert list(again.train_rows) == list(data.train_rows)
    # the rows of a step do not depend on the world size: rank r of W, micro-step m of A reads
    # from row step * W * A + r * A + m (train.py's start, with batch 1)
    def step_rows(world, accum, step):
        starts = [step * world * accum + r * accum + m for r in range(world) for m in range(accum)]
        return sorted(tuple(data.train_batch(k, 1)[0][0].tolist()) for k in starts)
    assert all(step_rows(1, 4, step) == step_rows(2, 2, step) for step in range(N // 4 + 2))


def test_bare_paths_keep_every_row(tmp_path, byte_dir):
    files = mixture_files(tmp_path)
    tok = Tokenizer(byte_dir)
    data = InstructionData(",".join(files.values()), tok, 64, "llama3", pack_rows=False)
    assert rows_by_source(data, tok) == {"A": 50, "B": 13, "C": 7}
    assert sorted(map(tuple, data.train_rows)) == [(i,) for i in range(70)]  # each example once
    text = data.summary()
    for s in data.sources:  # rows and tokens per source at start
        assert f"{s['path']} (chat, all rows)" in text
        assert f"{s['rows']:,} rows of the mixture ({s['tokens']:,} tokens)" in text
    assert sum(s["tokens"] for s in data.sources) == sum(len(data.train[i][0]) for i in range(len(data.train)))


def test_val_batches_by_source(tmp_path, byte_dir):
    files = mixture_files(tmp_path)
    data = InstructionData(",".join(files.values()), Tokenizer(byte_dir), 64, "llama3", val_fraction=0.2,
                           pack_rows=False)
    per_source = [sum(len(b[0]) for b in data.val_batches(100, source=i)) for i in range(3)]
    assert per_source == [s["val_examples"] for s in data.sources] and sum(per_source) == len(data.val)


@pytest.mark.parametrize("spec,error,match", [
    ("{A}:half", ValueError, r"the weight 'half' of '.*A.jsonl:half' is not a number"),
    ("{A}:0.5,{B}:-1", ValueError, r"the weight of '.*B.jsonl:-1' should be a positive number"),
    ("{A}:0.5,{B}", ValueError, r"give every source a weight, or none"),
    ("{A}:0.5,{dir}/missing.jsonl:0.5", FileNotFoundError, r"missing.jsonl: no such data file"),
    ("{A},", ValueError, r"an empty source"),
])
def test_bad_mixture_specs_name_the_source(tmp_path, byte_dir, spec, error, match):
    files = mixture_files(tmp_path)
    with pytest.raises(error, match=match):
        InstructionData(spec.format(A=files["A"], B=files["B"], dir=tmp_path), Tokenizer(byte_dir), 64, "llama3")


def test_data_hash_follows_contents_and_weights_not_paths(tmp_path):
    files = mixture_files(tmp_path)
    h = data_hash(f"{files['A']}:0.5,{files['B']}:0.5")
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(open(files["B"], "rb").read())
    assert data_hash(f"{files['A']}:0.5,{moved}:0.5") == h
    assert data_hash(f"{files['A']}:0.6,{files['B']}:0.4") != h
    moved.write_bytes(open(files["C"], "rb").read())
    assert data_hash(f"{files['A']}:0.5,{moved}:0.5") != h


# -----------------------------------------------------------------------------
# The token cache


def cached(spec, byte_dir, cache, **kw):
    logs = []
    data = InstructionData(str(spec), Tokenizer(kw.pop("tok_dir", byte_dir)), kw.pop("seq_len", 64), "llama3",
                           val_fraction=0.1, cache_dir=str(cache), log=logs.append, **kw)
    return data, logs


def test_cache_hit_equals_miss_and_skips_tokenizing(tmp_path, byte_dir, monkeypatch):
    files = mixture_files(tmp_path)
    spec = f"{files['A']}:0.6,{files['B']}:0.3,{files['C']}:0.1"
    cache = tmp_path / "cache"
    miss, logs = cached(spec, byte_dir, cache)
    assert any("building" in line for line in logs) and isinstance(miss.train.ids, np.memmap)
    no_cache = InstructionData(spec, Tokenizer(byte_dir), 64, "llama3", val_fraction=0.1)
    assert_same_data(miss, no_cache)
    monkeypatch.setattr(data_module, "tokenize_chunk", None)  # a hit must not tokenize
    hit, logs = cached(spec, byte_dir, cache)
    assert logs == [f"token cache: reading {miss.cache_path}"]
    assert_same_data(hit, miss)
    assert [name for name in os.listdir(cache)] == [os.path.basename(miss.cache_path)]  # no temporary left


def test_a_changed_file_tokenizer_or_seq_len_misses(tmp_path, byte_dir):
    path = write(tmp_path / "d.jsonl", numbered_chat(20), jsonl=True)
    cache = tmp_path / "cache"
    first, _ = cached(path, byte_dir, cache)
    # the same size, other contents
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("#1?", "#9?"))
    changed, logs = cached(path, byte_dir, cache)
    assert changed.cache_path != first.cache_path and any("building" in line for line in logs)
    # a tokenizer with two byte ranks swapped: same file size and template, other ids
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    lines = open(os.path.join(byte_dir, "tokenizer.model")).read().splitlines()
    (a, ra), (b, rb) = lines[ord("1")].split(), lines[ord("2")].split()
    lines[ord("1")], lines[ord("2")] = f"{a} {rb}", f"{b} {ra}"
    (swapped / "tokenizer.model").write_text("\n".join(lines) + "\n")
    other_tok, _ = cached(path, byte_dir, cache, tok_dir=str(swapped))
    assert not np.array_equal(other_tok.train.ids, changed.train.ids)  # the miss matters
    longer, _ = cached(path, byte_dir, cache, seq_len=65)
    no_pack, _ = cached(path, byte_dir, cache, pack_rows=False)
    paths = {d.cache_path for d in (first, changed, other_tok, longer, no_pack)}
    assert len(paths) == 5 and len(os.listdir(cache)) == 5


def test_a_truncated_cache_is_rebuilt_not_read(tmp_path, byte_dir):
    path = write(tmp_path / "d.jsonl", numbered_chat(20), jsonl=True)
    cache = tmp_path / "cache"
    good, _ = cached(path, byte_dir, cache)
    expected = [good.train[i] for i in range(len(good.train))]
    ids = os.path.join(good.cache_path, "ids.bin")
    with open(ids, "r+b") as f:
        f.truncate(os.path.getsize(ids) - 4)
    again, logs = cached(path, byte_dir, cache)
    assert any("is incomplete (ids.bin holds" in line for line in logs)
    assert_same_examples([again.train[i] for i in range(len(again.train))], expected)
    os.remove(os.path.join(good.cache_path, "header.json"))  # a build that stopped before its header
    _, logs = cached(path, byte_dir, cache)
    assert any("building" in line for line in logs)
    _, logs = cached(path, byte_dir, cache, rebuild_cache=True)
    assert any("building" in line for line in logs)


def test_other_ranks_wait_for_the_builder(tmp_path, byte_dir):
    path = write(tmp_path / "d.jsonl", numbered_chat(20), jsonl=True)
    cache = tmp_path / "cache"
    results = {}
    waiter = threading.Thread(target=lambda: results.update(waiter=cached(path, byte_dir, cache, builder=False)[0]))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # nothing to map yet: it waits, it does not build
    builder, _ = cached(path, byte_dir, cache)
    waiter.join(timeout=30)
    assert_same_data(results["waiter"], builder)
    # under --rebuild_cache the waiters take only the copy of this launch, not the old one
    waiter = threading.Thread(target=lambda: results.update(
        rebuilt=cached(path, byte_dir, cache, builder=False, rebuild_cache=True, build_id="run-2")[0]))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()
    cached(path, byte_dir, cache, rebuild_cache=True, build_id="run-2")
    waiter.join(timeout=30)
    assert_same_data(results["rebuilt"], builder)


# -----------------------------------------------------------------------------
# Bad input in the new formats


@pytest.mark.parametrize("records,match", [
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     r"bad.jsonl:1: conversations\[1\]: unknown role 'bot'"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}],
     r"bad.jsonl:1: conversations\[1\]: missing key 'value'"),
    (sharegpt_records() + [{"conversations": []}], r"bad.jsonl:2: 'conversations' is empty"),
    (chat_records() + [{"messages": []}], r"bad.jsonl:2: 'messages' is empty"),
    ([{"corpus": "", "instruction": "s", "conversation": []}], r"bad.jsonl:1: 'conversation' is empty"),
    ([{"query": "q", "response": 3}], r"bad.jsonl:1: 'response' should be a string"),
])
def test_bad_records_of_the_new_formats_name_the_record(tmp_path, byte_dir, records, match):
    with pytest.raises(ValueError, match=match):
        examples(write(tmp_path / "bad.jsonl", records, jsonl=True), byte_dir)


def test_a_corrupt_gzip_names_the_file(tmp_path, byte_dir):
    good = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in numbered_chat(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: cannot read it"):
        examples(tmp_path / "cut.jsonl.gz", byte_dir)
