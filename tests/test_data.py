"""data.py: formats, loss masks for every template, packing, order and sharding, bad data."""

import json

import pytest
import torch
import torch.nn.functional as F

from data import IGNORE_INDEX, InstructionData, attention_inputs, collate, read_records
from model import ModelConfig, Transformer
from moe import PESCConfig, upcycle
from tokenizer import Tokenizer, byte_to_unicode, write_byte_tokenizer

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
    assert torch.equal(kw["mask"][0], expected)
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
        for x, y in examples:
            alone = per_token_loss(model, torch.from_numpy(x).long()[None], torch.from_numpy(y).long()[None])[0]
            # fp32; only the summation order inside attention and matmuls differs: ~1e-6 on losses ~6
            torch.testing.assert_close(packed[start:start + len(x)], alone, atol=1e-5, rtol=1e-5)
            start += len(x)
    later = doc_ids[0] > 0
    assert (unmasked[later] - packed[later]).abs().max() > 1e-3, "the mask should matter"


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


def test_malformed_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"bad.json:3:\d+: malformed JSON"):
        read_records(str(path))


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
    assert len(data.train) == 2 and data.num_skipped == 2
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
