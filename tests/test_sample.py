"""sample.py: cached generation against full recomputation, batching, sampling filters, stops, the CLI."""

import io
import os
import pty
import re
import subprocess
import sys

import pytest
import torch

from model import ModelConfig, Transformer
from moe import PESCConfig, pesc_layers, upcycle
from sample import TextStream, generate, main, record_experts, sample_next
from tokenizer import Tokenizer, write_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(kind="dense"):
    """A random "tiny" model (GQA, vocab 512); "window" adds a 4-token sliding window, "pesc"
    upcycles it to 4 experts top-2 whose adapters are non-zero, so the routing matters."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", sliding_window=4 if kind == "window" else None))
    if kind == "pesc":
        upcycle(model, PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_scaling=1.0, adapter_dropout=0.0))
        with torch.no_grad():
            for ff in pesc_layers(model):
                ff.adapter_up.normal_(0, 1.0)  # upcycling leaves U_e = 0: the experts would not matter
    return model.eval()


def greedy_no_cache(model, prompt, n):
    """The oracle for generate's KV cache: recompute the whole sequence (no cache) at each step."""
    seq = torch.as_tensor(prompt)[None]
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0]


def random_prompt(length, seed):
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("kind", ["dense", "window", "pesc"])
def test_greedy_cache_matches_recompute(kind):
    model = tiny_model(kind)
    prompt = random_prompt(9, seed=1)  # longer than the window, so it bites in prefill and decode
    out = generate(model, prompt, 24, temperature=0)
    ref = greedy_no_cache(model, prompt, 24)
    assert out.shape == (1, 9 + 24)
    assert torch.equal(out[0], ref)
    assert len(set(ref[9:].tolist())) >= 6  # a varied continuation, not one token repeated


def test_pesc_experts_change_the_output():
    # guard for the PESC cases: the experts change the logits (std ~0.6) and the greedy tokens
    model, prompt = tiny_model("pesc"), random_prompt(9, seed=1)
    pesc = generate(model, prompt, 24, temperature=0)
    with torch.no_grad():
        a = model(pesc)[0]
        for ff in pesc_layers(model):
            ff.adapter_up.zero_()  # back to the dense model
        b = model(pesc)[0]
    assert (a - b).abs().max() > 0.1
    assert (generate(model, prompt, 24, temperature=0) != pesc).sum() > 12


@pytest.mark.parametrize("kind", ["window", "pesc"])
def test_batch_of_unequal_prompts(kind):
    model = tiny_model(kind)
    prompts = [random_prompt(n, seed=n) for n in (3, 11, 7)]
    out = generate(model, prompts, 16, temperature=0)
    assert out.shape == (3, 11 + 16)
    for row, p in zip(out, prompts):
        pad = 11 - len(p)
        assert (row[:pad] == -1).all()  # left padding is pad_id
        assert torch.equal(row[pad:], greedy_no_cache(model, p, 16))  # the row equals the prompt alone


def test_batch_positions_and_mask():
    # RoPE sees only position differences, and attention on the CPU returns zeros for a query
    # with no visible key (CUDA kernels may return NaN), so the outputs cannot show these two:
    # check what generate passes to the model.
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    # the mask the model builds from them (model.attention_mask), as attention receives it
    model.layers[0].attention.register_forward_pre_hook(lambda m, args: calls[-1].update(mask=args[3][:, 0]))
    generate(model, [random_prompt(2, seed=0), random_prompt(5, seed=1)], 3, temperature=0)
    assert len(calls) == 3  # prefill, then one step per new token but the last
    prefill, step1, step2 = calls
    assert prefill["positions"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]  # row 0: 3 pads
    assert step1["positions"].tolist() == [[2], [5]] and step2["positions"].tolist() == [[3], [6]]

    def visible(mask, b):
        return [row.nonzero().flatten().tolist() for row in mask[b]]

    assert prefill["mask"].shape == (2, 5, 8)  # (B, T, S): S = 5 prompt + 3 new slots
    assert visible(prefill["mask"], 0) == [[0], [1], [2], [3], [3, 4]]  # a pad query sees itself only
    assert visible(prefill["mask"], 1) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert visible(step2["mask"], 0) == [[3, 4, 5, 6]] and visible(step2["mask"], 1) == [list(range(7))]
    assert prefill["valid"].tolist() == [[False] * 3 + [True] * 2, [True] * 5]


def test_stops_at_a_stop_id():
    model = tiny_model()
    a, b = random_prompt(5, seed=3), random_prompt(8, seed=4)
    ref_a, ref_b = greedy_no_cache(model, a, 16)[5:].tolist(), greedy_no_cache(model, b, 16)[8:].tolist()
    # a stop id that row a produces first at step j >= 2 and row b never produces
    j = next(j for j in range(2, 16) if ref_a[j] not in ref_a[:j] and ref_a[j] not in ref_b)
    stop = ref_a[j]

    alone = generate(model, a, 16, temperature=0, stop_ids=[stop])
    assert alone[0].tolist() == a.tolist() + ref_a[:j + 1]  # ends right after the stop id

    out = generate(model, [a, b], 16, temperature=0, stop_ids=[stop, 511 if stop != 511 else 510])
    assert out.shape == (2, 8 + 16)  # row b ran on to max_new_tokens
    assert out[0].tolist() == [-1] * 3 + a.tolist() + ref_a[:j + 1] + [-1] * (15 - j)
    assert out[1].tolist() == b.tolist() + ref_b


def test_same_seed_same_samples():
    model = tiny_model("pesc")
    prompts = [random_prompt(4, seed=5), random_prompt(6, seed=6)]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 20, temperature=1.0, top_k=100, top_p=0.95, generator=g, **kw)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # vocab_size: ids at or past it are never sampled (a tokenizer smaller than the embedding)
    assert run(9, vocab_size=260)[:, 6:].max() < 260


def test_generate_rejects_too_long():
    model = tiny_model()  # max_seq_len 256
    with pytest.raises(ValueError, match="max_seq_len 256"):
        generate(model, random_prompt(200, seed=0), 57)


# -----------------------------------------------------------------------------
# sample_next on a constructed distribution

PROBS = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01])
PERM = torch.tensor([7, 2, 9, 0, 5, 3, 8, 1, 6, 4])  # vocab order != rank order: the filters must map back
N_DRAWS = 20000


def draw(**kw):
    logits = PROBS.log()[PERM].expand(N_DRAWS, -1)
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=10).float() / N_DRAWS  # frequency of each vocab id


@pytest.mark.parametrize("kw,kept", [
    (dict(top_k=3), 3),
    (dict(top_p=0.72), 4),  # mass above the 4th is 0.65 < 0.72, above the 5th 0.75
    (dict(top_k=4, top_p=0.6), 2),  # top-k first: renormalised 0.4, 0.27, ... -> two reach 0.6
    (dict(top_p=0.01), 1),
    (dict(temperature=0.5), 10),  # p^2, renormalised
    (dict(), 10),
])
def test_sample_filters(kw, kept):
    freq = draw(**kw)
    p = PROBS.pow(1 / kw.get("temperature", 1.0))
    p[kept:] = 0
    expected = (p / p.sum())[PERM]  # in vocab order: vocab id v has rank PERM[v]
    assert (freq[expected == 0] == 0).all()  # a filtered token is never drawn
    # a frequency over 20000 draws has a standard deviation <= 0.0035; 0.02 is over 5 of them
    assert (freq - expected).abs().max() < 0.02


def test_greedy_ignores_the_generator():
    logits = PROBS.log()[PERM].expand(4, -1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    ids = sample_next(logits, temperature=0, generator=g)
    assert ids.tolist() == [PERM.tolist().index(0)] * 4
    assert torch.equal(g.get_state(), state)  # greedy draws nothing


# -----------------------------------------------------------------------------
# What the CLI builds on: streaming text, recording experts


def test_text_stream_never_splits_a_character(tmp_path):
    tok = Tokenizer(write_byte_tokenizer(str(tmp_path / "tokenizer.model")))
    text = "héllo ✓ 漢字 🙂!"
    out, seen = io.StringIO(), []
    stream = TextStream(tok, out)
    for id in tok.encode(text):  # one byte per token: multi-byte characters arrive in pieces
        stream.put(id)
        seen.append(out.getvalue())
    stream.end()
    assert all("\ufffd" not in s and text.startswith(s) for s in seen)
    assert len(set(seen)) == len(text)  # each character is written as soon as its last byte came
    assert out.getvalue() == text


def test_recorded_experts_match_a_full_forward():
    model = tiny_model("pesc")
    chosen = record_experts(model)
    prompt = random_prompt(6, seed=7)
    per_token = []
    out = generate(model, prompt, 10, temperature=0,
                   on_token=lambda ids: per_token.append([c[-1].tolist() for c in chosen]))
    with torch.no_grad():
        model(out)  # without the cache: each layer's (T, k) experts for the whole sequence
    # the token generated at step t came from the forward of position 6 + t - 1
    full = [[c[6 + t - 1].tolist() for c in chosen] for t in range(10)]
    assert per_token == full
    assert len({str(e) for e in per_token}) > 2  # the routing varies from token to token


# -----------------------------------------------------------------------------
# The command line, end to end


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A dense and a PESC tiny checkpoint, each with the byte-level tokenizer beside it."""
    root = tmp_path_factory.mktemp("ckpt")
    for kind in ("dense", "pesc"):
        tiny_model(kind).save_pretrained(root / kind)
        write_byte_tokenizer(str(root / kind / "tokenizer.model"))
    return root


def start_cli(*args, stdin=None):
    """sample.py in a subprocess; finish_cli(p) waits for it. Started together, runs overlap."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def finish_cli(p):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    return out.decode("utf-8"), err.decode("utf-8")  # from bytes: keep any "\r" the model writes


def expected_greedy(ckpt, ids, n):
    """(new ids, text) of greedy decoding in-process, as the CLI should print it."""
    model, tok = Transformer.from_pretrained(ckpt).eval(), Tokenizer(str(ckpt))
    new = generate(model, [ids], n, temperature=0, stop_ids=tok.stop_ids)[0, len(ids):].tolist()
    return new, tok.decode([i for i in new if i not in tok.stop_ids])


def test_cli_prompt_from_file_and_stdin(ckpts, tmp_path):
    ckpt = ckpts / "dense"
    flags = ["--ckpt", str(ckpt), "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]
    (tmp_path / "p.txt").write_text("Hi there")
    from_file = start_cli(*flags, "--prompt", f"FILE:{tmp_path / 'p.txt'}")
    with open(tmp_path / "p.txt") as f:
        from_stdin = start_cli(*flags, "--prompt", "-", stdin=f)
    _, text = expected_greedy(ckpt, Tokenizer(str(ckpt)).encode("Hi there", bos=True), 12)
    for p in (from_file, from_stdin):
        out, err = finish_cli(p)
        assert out == text + "\n"
        assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s", err)


def test_cli_chat_show_experts(ckpts):
    ckpt = ckpts / "pesc"
    p = start_cli("--ckpt", str(ckpt), "--chat", "--system", "Be brief.", "--prompt", "Hi",
                  "--show_experts", "--max_new_tokens", "8", "--temperature", "0", stdin=subprocess.DEVNULL)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids, _ = Tokenizer(str(ckpt)).encode_chat(messages, add_generation_prompt=True)
    new, text = expected_greedy(ckpt, ids, 8)
    out, _ = finish_cli(p)
    assert out.startswith(text + "\nexperts per generated token")
    rows = re.findall(r"^ +(\d+) .* L0:([0-3]),([0-3])  L1:([0-3]),([0-3])$", out, re.M)
    assert [int(r[0]) for r in rows] == new  # one row per generated token, in order
    assert all(r[1] != r[2] and r[3] != r[4] for r in rows)  # top-2: two different experts


def test_cli_interactive_chat_keeps_the_history(ckpts):
    # stdin is a terminal (a pseudo-terminal): two user turns, then end of input (Ctrl-D)
    ckpt = ckpts / "dense"
    master, slave = pty.openpty()
    os.write(master, b"hello\nagain\n\x04")
    try:
        p = start_cli("--ckpt", str(ckpt), "--chat", "--max_new_tokens", "5", "--temperature", "0", stdin=slave)
        out, _ = finish_cli(p)
    finally:
        os.close(slave)
        os.close(master)
    tok = Tokenizer(str(ckpt))
    messages, answers = [], []
    for user in ("hello", "again"):
        messages.append({"role": "user", "content": user})
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)  # the whole history each turn
        answers.append(expected_greedy(ckpt, ids, 5)[1])
        messages.append({"role": "assistant", "content": answers[-1]})
    assert out == f"> {answers[0]}\n> {answers[1]}\n> \n"


def test_cli_errors(ckpts):
    with pytest.raises(SystemExit, match="dense model"):
        main(["--ckpt", str(ckpts / "dense"), "--show_experts", "--prompt", "x"])
    with pytest.raises(SystemExit):  # argparse: --system needs --chat
        main(["--ckpt", str(ckpts / "dense"), "--system", "x"])
