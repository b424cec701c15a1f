"""eval.py: prompts, token boundaries and metrics as lm-evaluation-harness has them, the packed
batched scoring against one forward per request, generation, routing shares, the command line
(one and two processes), and the harness adapter against the harness's own HF backend."""
import csv
import io
import json
import os
import random
import subprocess
import sys

import pytest
import sentencepiece
import torch
import torch.nn.functional as F

import eval as ev
from files import checkpoint_fingerprint
from model import ModelConfig, Transformer
from moe import PESCConfig, pesc_layers, route, upcycle
from sample import generate
from tokenizer import Tokenizer, write_byte_tokenizer
from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig.from_preset("tiny")
LL_REDUCTION = TINY.dim * TINY.n_layers  # the longest sum on a logit's path, for the tolerance


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(kind="dense", **overrides):
    """A random tiny model; "pesc": 4 experts top-2 with non-zero adapters, so routing matters."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides))
    if kind == "pesc":
        upcycle(model, PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_scaling=1.0, adapter_dropout=0.0))
        with torch.no_grad():
            for ff in pesc_layers(model):
                ff.adapter_up.normal_(0, 1.0)
    return model.eval()


SP_TEXT = ["the quick brown fox jumps over the lazy dog", "a llama, a camel and a mixture of experts",
           "Question: what is 2 + 3?\nAnswer: 5", "The following are multiple choice questions"] * 20


def write_sentencepiece(path):
    """A tiny Llama-2-like SentencePiece model: BPE, byte fallback, no normalisation."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT), model_writer=buf, vocab_size=400, model_type="bpe", bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return Tokenizer(write_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    return Tokenizer(write_byte_tokenizer(str(tmp_path_factory.mktemp("byte") / "tokenizer.model")))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny dense (SentencePiece tokenizer, its 400 ids exactly) and PESC (byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("ckpt")
    tiny_model("dense", vocab_size=400).save_pretrained(root / "dense")
    write_sentencepiece(root / "dense" / "tokenizer.model")
    tiny_model("pesc").save_pretrained(root / "pesc")
    write_byte_tokenizer(str(root / "pesc" / "tokenizer.model"))
    return root


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_mmlu(folder, subjects=("high_school_physics", "astronomy"), n_test=3, n_dev=5, bad=None):
    for split, n in (("test", n_test), ("dev", n_dev)):
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        for s in subjects:
            with open(os.path.join(folder, split, f"{s}_{split}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                for i in range(n):
                    w.writerow([f" What is {i} + {i}? ", str(2 * i), str(i), "3, or so", "7", "ABCD"[i % 4]])
                if bad is not None and split == "test":
                    w.writerow(bad)
    return str(folder)


def gsm8k_rows(n, offset=0):
    return [{"question": f"Tom has {i} apples and buys 2. How many now?",
             "answer": f"He has {i} + 2 = {i + 2} apples.\n#### {i + 2}"} for i in range(offset, offset + n)]


def arc_rows(n):
    return [{"id": str(i), "question": {"stem": f"Which is more than {i}?",
                                        "choices": [{"text": str(i - 1), "label": "A"},
                                                    {"text": f"{i + 1} or more", "label": "B"},
                                                    {"text": "none", "label": "C"}]},
             "answerKey": "ABC"[i % 3]} for i in range(n)]


def reference_loglikelihood(model, ctx, cont):
    """sum log p(cont | ctx) from one plain forward of ctx + cont[:-1] (the harness's way)."""
    ids = torch.tensor([ctx + cont[:-1]])
    logprobs = F.log_softmax(model(ids)[0][0].float(), dim=-1)
    rows = logprobs[len(ctx) - 1:]
    cont = torch.tensor(cont)
    return rows.gather(-1, cont[:, None]).sum().item(), bool((rows.argmax(-1) == cont).all())


# -----------------------------------------------------------------------------
# Prompts and token boundaries


def test_mmlu_prompt_is_the_harness_template(tmp_path):
    task = ev.load_task(f"mmlu={write_mmlu(tmp_path)}", shots=2, limit=None)
    assert task.kind == "mc" and len(task.items) == 6  # subjects sorted: astronomy first
    item = task.items[4]  # high_school_physics, question 1
    assert item.prompt == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 0 + 0?\nA. 0\nB. 0\nC. 3, or so\nD. 7\nAnswer: A\n\n"
        "What is 1 + 1?\nA. 2\nB. 1\nC. 3, or so\nD. 7\nAnswer: B\n\n"
        "What is 1 + 1?\nA. 2\nB. 1\nC. 3, or so\nD. 7\nAnswer:")
    assert item.choices == ["A", "B", "C", "D"] and item.gold == 1
    assert len(ev.load_task(f"mmlu={tmp_path}", shots=0, limit=2).items) == 4  # --limit per subject


def test_hellaswag_arc_gsm8k_prompts_and_shot_sampling(tmp_path):
    hs = [{"activity_label": "Baking", "ctx_a": "A cook mixes flour.", "ctx_b": "she THEN", "ctx": "unused",
           "endings": ["bakes it [title] in an oven.", "sings  loudly."], "label": i % 2} for i in range(3)]
    shots = [{**h, "activity_label": f"Shot{i}"} for i, h in enumerate(hs)]
    files = f"{write_jsonl(tmp_path / 'hs.jsonl', hs)},{write_jsonl(tmp_path / 's.jsonl', shots)}"
    task = ev.load_task(f"hellaswag={files}", shots=2, limit=None)
    rnd = random.Random(1234)  # the harness's default sampler: one generator, rnd.sample per document
    for item in task.items:
        drawn = rnd.sample(range(3), 2)
        endings = ["bakes it. in an oven.", "sings loudly."]
        examples = "".join(f"Shot{j}: A cook mixes flour. She then {endings[j % 2]}\n\n" for j in drawn)
        assert item.prompt == examples + "Baking: A cook mixes flour. She then"
        assert item.choices == ["bakes it. in an oven.", "sings loudly."]

    arc = ev.load_task(f"mc={write_jsonl(tmp_path / 'arc.jsonl', arc_rows(2))}", shots=0, limit=None)
    assert arc.name == "mc:arc" and arc.items[1].prompt == "Question: Which is more than 1?\nAnswer:"
    assert arc.items[1].choices == ["0", "2 or more", "none"] and arc.items[1].gold == 1
    generic = [{"question": "Pick b", "choices": ["a", "b"], "answer": 1}]
    assert ev.load_task(f"mc={write_jsonl(tmp_path / 'g.jsonl', generic)}", 0, None).items[0].gold == 1

    gsm = ev.load_task(f"gsm8k={write_jsonl(tmp_path / 'g8.jsonl', gsm8k_rows(2))},"
                       f"{write_jsonl(tmp_path / 'g8s.jsonl', gsm8k_rows(1, offset=5))}", shots=1, limit=None)
    assert gsm.items[0].prompt == ("Question: Tom has 5 apples and buys 2. How many now?\nAnswer: He has 5 + 2 = 7 "
                                   "apples.\n#### 7\n\nQuestion: Tom has 0 apples and buys 2. How many now?\nAnswer:")


def test_encode_pair_is_the_harness_split(sp, byte_tok):
    for tok in (sp, byte_tok):
        ctx, cont = ev.encode_pair(tok, "Question: the fox\nAnswer:", " a llama")
        whole = tok.encode("Question: the fox\nAnswer: a llama", bos=True)
        assert ctx == tok.encode("Question: the fox\nAnswer:", bos=True) and ctx[0] == tok.bos_id
        assert ctx + cont == whole
        # trailing whitespace of the context moves to the continuation
        assert ev.encode_pair(tok, "Question: the fox\nAnswer: ", "a llama") == (ctx, cont)
        # an empty context is the BOS token
        assert ev.encode_pair(tok, "", "the fox") == ([tok.bos_id], tok.encode("the fox"))
    # SentencePiece marks a word's leading space inside its piece: the continuation's ids are
    # those of the joint encoding, not of the continuation encoded alone
    ctx, cont = ev.encode_pair(sp, "Question: the fox\nAnswer:", " a llama")
    assert cont == sp.encode("Question: the fox\nAnswer: a llama", bos=True)[len(ctx):]
    assert cont != sp.encode(" a llama")


def test_rolling_windows_are_the_harness_windows():
    utils = pytest.importorskip("lm_eval.utils")  # CI installs lm-eval (requirements-dev.txt)
    for n in (1, 5, 7, 8, 9, 16, 17, 30):
        ids = list(range(100, 100 + n))
        ours = ev.rolling_windows(ids, 1, 8)
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(ids, 1, 8, 1)]
        assert ours == [(list(a), list(b)) for a, b in theirs]
        assert [t for _, pred in ours for t in pred] == ids  # every id predicted exactly once
        assert all(len(c) + len(p) <= 9 for c, p in ours)


# -----------------------------------------------------------------------------
# Scoring against the model's own logits


def requests_for(tok, prompts, choices):
    return [(ev.encode_pair(tok, p, " " + choices[0])[0], [ev.encode_pair(tok, p, " " + c)[1] for c in choices])
            for p in prompts]


@pytest.mark.parametrize("kind", ["dense", "pesc"])
def test_batched_loglikelihoods_equal_one_at_a_time(kind, byte_tok):
    model = tiny_model(kind)
    prompts = ["Question: which animal?\nAnswer:", "Hi", "A much longer prompt about llamas and camels:"]
    reqs = requests_for(byte_tok, prompts, ["llama", "a camel", "x"])
    batched = ev.loglikelihoods(model, reqs, batch_size=3)
    single = [ev.loglikelihoods(model, [r], batch_size=1)[0] for r in reqs]
    for (ctx, conts), b, s in zip(reqs, batched, single):
        for cont, (ll_b, g_b), (ll_s, g_s) in zip(conts, b, s):
            ref_ll, ref_greedy = reference_loglikelihood(model, ctx, cont)
            for ll in (ll_b, ll_s):
                assert_close(torch.tensor(ll), torch.tensor(ref_ll), reduction=LL_REDUCTION * len(cont))
            assert g_b == g_s == ref_greedy


def test_truncated_requests_keep_the_harness_window(byte_tok):
    model = tiny_model("dense", max_seq_len=16)
    conts = [byte_tok.encode(" yes"), byte_tok.encode(" no way")]
    # a long context cuts both rows; a short one only the second, whose row then runs first
    for text in ("a context much longer than sixteen tokens:", "short ctx:"):
        ctx = byte_tok.encode(text, bos=True)
        (got,) = ev.loglikelihoods(model, [(ctx, conts)], batch_size=1)
        for cont, (ll, _) in zip(conts, got):
            keep = (ctx + cont)[-17:]  # the harness keeps the last max_len + 1 tokens
            ref, _ = reference_loglikelihood(model, keep[:-len(cont)], cont)
            assert_close(torch.tensor(ll), torch.tensor(ref), reduction=LL_REDUCTION * len(cont))


def test_mc_metrics_from_the_models_logits(tmp_path, byte_tok):
    model = tiny_model("dense")
    task = ev.load_task(f"mc={write_jsonl(tmp_path / 'arc.jsonl', arc_rows(6))}", shots=0, limit=None)
    args = type("A", (), dict(batch_size=4, max_new_tokens=8, quiet=True))
    outcomes, counts = ev.run_task(model, byte_tok, task, args)
    assert counts is None  # dense: no routing
    rows, samples = ev.score_task(task, outcomes)
    acc, acc_norm = [], []
    for item, s in zip(task.items, samples):
        lls = []
        for c in item.choices:
            ctx, cont = ev.encode_pair(byte_tok, item.prompt, " " + c)
            lls.append(reference_loglikelihood(model, ctx, cont)[0])
        assert_close(torch.tensor(s["loglikelihoods"]), torch.tensor(lls), reduction=LL_REDUCTION * 10)
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i]))
        acc.append(best == item.gold)
        acc_norm.append(best_norm == item.gold)
        assert s["prediction"] == best and s["target"] == item.gold
    values = {r["metric"]: r["value"] for r in rows}
    assert values == {"acc": sum(acc) / 6, "acc_norm": sum(acc_norm) / 6}
    assert all(r["n"] == 6 and r["stderr"] is not None for r in rows)


def test_acc_and_acc_norm_differ_on_a_built_case():
    # "a" is likelier in total, "bbbbbb" per character: acc picks 0, acc_norm picks 1
    assert ev.choice_predictions([-2.0, -3.0], ["a", "bbbbbb"]) == (0, 1)
    task = ev.Task("t", "mc", [ev.Item(0, "p", ["a", "bbbbbb"], gold=0), ev.Item(1, "p", ["a", "bbbbbb"], gold=1)])
    rows, _ = ev.score_task(task, [[(-2.0, False), (-3.0, False)]] * 2)
    assert {r["metric"]: r["value"] for r in rows} == {"acc": 0.5, "acc_norm": 0.5}
    rows, _ = ev.score_task(task, [[(-2.0, False), (-3.0, False)], [(-1.0, False), (-9.0, False)]])
    assert {r["metric"]: r["value"] for r in rows} == {"acc": 0.5, "acc_norm": 0.0}


def test_rolling_perplexity_equals_a_direct_computation(byte_tok):
    model = tiny_model("dense")
    text = "The quick brown fox jumps over the lazy dog."
    ids = byte_tok.encode(text, bos=True)
    logprobs = F.log_softmax(model(torch.tensor([[byte_tok.bos_id] + ids[:-1]]))[0][0].float(), dim=-1)
    direct = logprobs.gather(-1, torch.tensor(ids)[:, None]).sum().detach()
    ((ll, n),) = ev.rolling_loglikelihood(model, byte_tok, [text])
    assert n == len(ids)
    assert_close(torch.tensor(ll), direct, reduction=LL_REDUCTION * len(ids))
    task = ev.Task("ppl:x", "ppl", [ev.Item(0, "", target=text)])
    values = {r["metric"]: r["value"] for r in ev.score_task(task, [(ll, n)])[0]}
    assert values["token_perplexity"] == pytest.approx(float(torch.exp(-direct / n)), rel=1e-5)
    assert values["bits_per_byte"] == pytest.approx(float(-direct / len(text.encode()) / torch.log(torch.tensor(2.0))),
                                                    rel=1e-5)
    # a text longer than the context: windows, each id still scored once, against their direct sums
    short = tiny_model("dense", max_seq_len=16)
    ((ll, n),) = ev.rolling_loglikelihood(short, byte_tok, [text])
    total = 0.0
    for ctx, pred in ev.rolling_windows(ids, byte_tok.bos_id, 16):
        total += reference_loglikelihood(short, ctx, pred)[0]
    assert n == len(ids)
    assert_close(torch.tensor(ll), torch.tensor(total), reduction=LL_REDUCTION * len(ids))


# -----------------------------------------------------------------------------
# Generation and GSM8K


def greedy_reference(model, tok, prompt, n):
    ids = tok.encode(prompt, bos=True)
    new = []
    for _ in range(n):
        logits = model(torch.tensor([ids + new]))[0][0, -1, :tok.vocab_size]
        new.append(int(logits.argmax()))
        if new[-1] in tok.stop_ids:
            new.pop()
            break
    return tok.decode(new)


def test_generation_is_greedy_and_cut_at_stop_strings(byte_tok):
    model = tiny_model("pesc")
    prompts = ["Question: 1 + 1?\nAnswer:", "Hi", "Question: a longer one, 2 + 2?\nAnswer:"]
    full = [greedy_reference(model, byte_tok, p, 12) for p in prompts]
    assert ev.generate_until(model, byte_tok, prompts, [], max_new_tokens=12, batch_size=2) == full
    stop = full[0][3:5]  # a stop string the first row produces
    got = ev.generate_until(model, byte_tok, prompts, [stop], max_new_tokens=12, batch_size=3)
    assert got == [f.split(stop)[0] for f in full]
    assert got[0] == full[0][:full[0].index(stop)]


def test_gsm8k_extraction_edge_cases():
    assert ev.gsm8k_strict("so 3 + 4 = 7\n#### 7") == "7"
    assert ev.gsm8k_strict("#### -1,234.5 dollars") == "-1,234.5"
    assert ev.gsm8k_strict("#### 5 and later #### 6") == "5"  # the first
    assert ev.gsm8k_strict("The answer is 7.") == "[invalid]"
    assert ev.gsm8k_flexible("3 apples, then 12 more: 15.") == "15."
    assert ev.gsm8k_flexible("It costs $1,200 in total") == "$1,200"
    assert ev.gsm8k_flexible("answer: 7") == "7"  # a single digit through the second alternative
    assert ev.gsm8k_flexible("no number here") == "[invalid]"
    ref = ev.gsm8k_normalize("He pays 2 * $600 = $1,200.\n#### 1,200")
    assert ref == "1200"
    assert ev.gsm8k_normalize("$1,200") == ev.gsm8k_normalize("1200.") == ref
    assert ev.gsm8k_normalize("[invalid]") != ref
    task = ev.Task("gsm8k", "gen", [ev.Item(0, "q", target="x\n#### 1,200"), ev.Item(1, "q", target="#### 5")])
    assert ev.gsm8k_strict("#### $1,200") == "[invalid]"  # no "$" after "#### ", as in the harness
    rows, samples = ev.score_task(task, ["It is 1200.\n#### 1,200.", "maybe 4, no: 5.\n\n"])
    values = {r["metric"]: r["value"] for r in rows}
    assert values == {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 1.0}
    assert samples[1]["prediction"] == {"strict-match": "[invalid]", "flexible-extract": "5."}
    assert samples[1]["generation"] == "maybe 4, no: 5.\n\n" and "loglikelihoods" not in samples[1]


# -----------------------------------------------------------------------------
# Bad input


def test_bad_input_is_a_clear_error(tmp_path):
    folder = write_mmlu(tmp_path / "m1", bad=["q", "a", "b", "c", "d"])
    with pytest.raises(ev.TaskError, match=r"test/astronomy_test\.csv:4: expected 6 columns"):
        ev.load_task(f"mmlu={folder}", 0, None)
    folder = write_mmlu(tmp_path / "m2", bad=["q", "a", "b", "c", "d", "E"])
    with pytest.raises(ev.TaskError, match=r"_test\.csv:4: answer 'E' is not one of the choices"):
        ev.load_task(f"mmlu={folder}", 0, None)
    folder = write_mmlu(tmp_path / "m3", n_dev=2)
    with pytest.raises(ev.TaskError, match=r"astronomy_dev\.csv: --shots 5 but the dev split has only 2"):
        ev.load_task(f"mmlu={folder}", 5, None)
    rows = arc_rows(3)
    rows[1]["answerKey"] = "Z"
    with pytest.raises(ev.TaskError, match=r"arc\.jsonl:2: answer 'Z' is not among the 3 choices"):
        ev.load_task(f"mc={write_jsonl(tmp_path / 'arc.jsonl', rows)}", 0, None)
    hs = [{"ctx": "c", "endings": ["a", "b"], "label": 2}]
    with pytest.raises(ev.TaskError, match=r"hs\.jsonl:1: answer 2 is not among the 2 choices"):
        ev.load_task(f"hellaswag={write_jsonl(tmp_path / 'hs.jsonl', hs)}", 0, None)
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(gsm8k_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ev.TaskError, match=r"g\.jsonl:2: not JSON"):
        ev.load_task(f"gsm8k={path}", 0, None)
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ev.TaskError, match=r"g\.jsonl:1: missing key 'answer'"):
        ev.load_task(f"gsm8k={path}", 0, None)
    good = write_jsonl(tmp_path / "g2.jsonl", gsm8k_rows(2))
    with pytest.raises(ev.TaskError, match=r"--shots 3: the few-shot file has only 2 examples"):
        ev.load_task(f"gsm8k={good},{good}", 3, None)
    with pytest.raises(ev.TaskError, match=r"needs a few-shot file"):
        ev.load_task(f"gsm8k={good}", 1, None)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ev.TaskError, match=r"empty\.jsonl: no documents to score"):
        ev.load_task(f"ppl={tmp_path / 'empty.jsonl'}", 0, None)
    with pytest.raises(ev.TaskError, match=r"KIND one of"):
        ev.load_task(f"squad={good}", 0, None)


# -----------------------------------------------------------------------------
# Experts per task


def test_routing_share_counts_the_tokens_the_model_saw(byte_tok):
    model = tiny_model("pesc")
    reqs = requests_for(byte_tok, ["Question: which?\nAnswer:", "Hello there"], ["llama", "a camel"])
    with ev.routing_counts(model) as counts:
        ev.loglikelihoods(model, reqs, batch_size=2)
    # reference: the router's own top-k on each context once and each continuation's fed ids
    layers = pesc_layers(model)
    chosen = [None] * len(layers)
    hooks = [ff.router.register_forward_hook(lambda m, i, out, l=l: chosen.__setitem__(l, route(out, 2)[1]))
             for l, ff in enumerate(layers)]
    expected = torch.zeros_like(counts)
    with torch.no_grad():
        for ctx, conts in reqs:
            model(torch.tensor([ctx]))
            for l in range(len(layers)):
                expected[l] += torch.bincount(chosen[l].reshape(-1), minlength=4).double()
            for cont in conts:
                model(torch.tensor([ctx + cont[:-1]]))
                for l in range(len(layers)):
                    expected[l] += torch.bincount(chosen[l][len(ctx):].reshape(-1), minlength=4).double()
    for h in hooks:
        h.remove()
    assert torch.equal(counts, expected)
    share = ev.routing_share(counts)
    assert all(abs(sum(row) - 1) < 1e-12 for row in share)


def test_routing_heatmap_is_a_png(tmp_path):
    share = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    assert ev.plot_routing({"mc: <tiny>": share, "ppl": share[::-1]}, str(tmp_path / "r.png"), "a title")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["r.png"]  # nothing left under a temporary name


# -----------------------------------------------------------------------------
# The command line


def write_tasks(folder):
    return [f"mmlu={write_mmlu(folder / 'mmlu')}",
            f"gsm8k={write_jsonl(folder / 'g.jsonl', gsm8k_rows(3))},"
            f"{write_jsonl(folder / 'gs.jsonl', gsm8k_rows(3, 10))}",
            f"mc={write_jsonl(folder / 'arc.jsonl', arc_rows(5))},{write_jsonl(folder / 'arcs.jsonl', arc_rows(3))}",
            f"ppl={write_jsonl(folder / 'text.jsonl', [{'text': 'a llama. ' * k} for k in (2, 40)])}"]


def cli_args(ckpt, tasks, out, samples):
    args = ["--ckpt", str(ckpt), "--shots", "2", "--max_new_tokens", "6", "--limit", "2", "--batch_size", "3",
            "--results", str(out), "--log_samples", str(samples), "--quiet"]
    for t in tasks:
        args += ["--task", t]
    return args


def test_cli_writes_results_samples_and_heatmaps(tmp_path, ckpts, capsys):
    tasks = write_tasks(tmp_path)
    ev.main(cli_args(ckpts / "pesc", tasks, tmp_path / "out" / "r.json", tmp_path / "s.jsonl"))
    assert "| mmlu | 2 | acc |" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert result["checkpoint"]["fingerprint"] == checkpoint_fingerprint(str(ckpts / "pesc"))
    assert result["options"]["shots"] == 2 and result["options"]["limit"] == 2
    got = {(r["task"], r["metric"]): r for r in result["results"]}
    assert set(got) == {("mmlu", "acc"), ("mmlu", "acc_norm"), ("gsm8k", "exact_match,strict-match"),
                        ("gsm8k", "exact_match,flexible-extract"), ("mc:arc", "acc"), ("mc:arc", "acc_norm"),
                        ("ppl:text", "token_perplexity"), ("ppl:text", "byte_perplexity"),
                        ("ppl:text", "bits_per_byte")}
    assert got["mmlu", "acc"]["n"] == 4 and got["gsm8k", "exact_match,strict-match"]["n"] == 2  # --limit 2
    assert all(set(r) == {"task", "shots", "metric", "value", "stderr", "n"} for r in result["results"])
    assert (tmp_path / "out" / "r.routing.png").read_bytes()[:4] == b"\x89PNG"  # one panel per task
    assert len(result["routing"]["mmlu"]["share"]) == TINY.n_layers
    lines = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 4 + 2 + 2 + 2
    for line in lines:
        assert {"task", "doc_id", "prompt", "choices", "prediction", "target"} <= set(line)
        assert ("generation" in line) == (line["task"] == "gsm8k")
        assert ("loglikelihoods" in line) == (line["task"] != "gsm8k")
    mmlu = [l for l in lines if l["task"] == "mmlu"]
    assert [len(l["loglikelihoods"]) for l in mmlu] == [4] * 4 and mmlu[0]["prompt"].endswith("Answer:")


def test_two_processes_give_the_same_results(tmp_path, ckpts):
    tasks = write_tasks(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out, samples = tmp_path / f"r{n}.json", tmp_path / f"s{n}.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.join(ROOT, "eval.py"), *cli_args(ckpts / "pesc", tasks, out, samples)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = json.loads(out.read_text()), [json.loads(l) for l in samples.read_text().splitlines()]
    (r1, s1), (r2, s2) = runs[1], runs[2]
    assert r2["world_size"] == 2
    assert [(r["task"], r["metric"], r["n"]) for r in r1["results"]] == [(r["task"], r["metric"], r["n"])
                                                                           for r in r2["results"]]
    for a, b in zip(r1["results"], r2["results"]):
        assert_close(torch.tensor(b["value"]), torch.tensor(a["value"]), reduction=LL_REDUCTION * 100, name=a["metric"])
    assert [(s["task"], s["doc_id"], s["prompt"], s["prediction"], s.get("generation")) for s in s1] == \
           [(s["task"], s["doc_id"], s["prompt"], s["prediction"], s.get("generation")) for s in s2]
    for task in r1["routing"]:  # the same tokens routed the same way: the same counts
        assert r1["routing"][task]["assignments"] == r2["routing"][task]["assignments"]


# -----------------------------------------------------------------------------
# The lm-evaluation-harness adapter against the harness's own Hugging Face backend


def test_adapter_matches_the_harness_hf_backend(tmp_path, ckpts, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")  # CI installs lm-eval and transformers (requirements-dev.txt)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from convert import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf_dir = tmp_path / "hf"
    export_hf(str(ckpts / "dense"), str(hf_dir))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    ours = ev.PESCLM(ckpt=str(ckpts / "dense"), batch_size=4, device="cpu")
    assert isinstance(ours, lm_eval.api.model.LM)
    from lm_eval.api.registry import get_model
    assert get_model("pesc") is type(ours)

    # the two tokenizers agree on these texts (none starts with a space, where HF's Llama
    # tokenizer and SentencePiece differ), so any difference below would be the adapter's
    texts = ["Question: the quick brown fox?\nAnswer:", "Question: the quick brown fox?\nAnswer: a llama",
             "the lazy dog and a camel. " * 6]
    for t in texts:
        assert hf.tok_encode(t) == ours.tokenizer.encode(t, bos=True)

    rows = [{"question": q, "choices": ["a llama", "the lazy dog", "experts"], "answer": i % 3}
            for i, q in enumerate(["the quick brown fox?", "a camel and a mixture?", "what is 2 + 3?"])]
    (tmp_path / "tasks").mkdir()
    write_jsonl(tmp_path / "tasks" / "mc.jsonl", rows)
    write_jsonl(tmp_path / "tasks" / "text.jsonl", [{"text": texts[2]}, {"text": "a llama, a camel " * 20}])
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tasks' / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tmp_path / "tasks" / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tasks' / 'text.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: byte_perplexity\n')
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    results = {}
    for name, lm in (("hf", hf), ("pesc", ours)):
        results[name] = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl"], num_fewshot=1,
                                                log_samples=True, task_manager=manager)
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = results["hf"]["samples"][task], results["pesc"]["samples"][task]
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]  # the same prompts
        lls_hf = torch.tensor([[r[0] if isinstance(r, (list, tuple)) else r for r in s["resps"]] for s in a],
                              dtype=torch.float64).reshape(len(a), -1)
        lls_ours = torch.tensor([[r[0] if isinstance(r, (list, tuple)) else r for r in s["resps"]] for s in b],
                                dtype=torch.float64).reshape(len(b), -1)
        assert_close(lls_ours, lls_hf, dtype=torch.float32, reduction=LL_REDUCTION * 100, name=task)
    # generation: the same greedy ids as transformers' generate; the text is their decoding cut at
    # the stop strings (texts are not compared with HF's: a random model emits byte pieces that
    # are no UTF-8, which HF's decoder and SentencePiece's replace differently)
    for t in texts[:2]:
        ids = hf.tok_encode(t)
        hf_new = hf.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=2)[0, len(ids):].tolist()
        our_new = [i for i in generate(ours.model, [ids], 6, temperature=0, stop_ids=[2])[0, len(ids):].tolist()
                   if i >= 0]
        assert our_new == hf_new
        (text,) = ours.generate_until([Instance("generate_until", {}, (t, {"until": ["fox"], "max_gen_toks": 6}), 0)],
                                      disable_tqdm=True)
        assert text == ev.cut_at_stops(ours.tokenizer.decode([i for i in our_new if i != 2]), ["fox", "</s>"])

    # the command line: the harness's own task definitions through the adapter
    out, samples = tmp_path / "h.json", tmp_path / "h.jsonl"
    ev.main(["--ckpt", str(ckpts / "dense"), "--harness", "tiny_mc", "--include_path", str(tmp_path / "tasks"),
             "--shots", "1", "--batch_size", "4", "--device", "cpu", "--results", str(out), "--log_samples", str(samples)])
    written = json.loads(out.read_text())
    assert written["results"]["tiny_mc"]["acc,none"] == results["pesc"]["results"]["tiny_mc"]["acc,none"]
    assert written["checkpoint"]["fingerprint"] == checkpoint_fingerprint(str(ckpts / "dense"))
    assert [json.loads(l)["task"] for l in samples.read_text().splitlines()] == ["tiny_mc"] * 3


def test_eval_runs_without_lm_eval_and_says_how_to_install_it(tmp_path, ckpts):
    # a fresh interpreter where lm-eval cannot be imported: eval.py imports, says how to get the
    # harness, and runs local tasks
    task = f"mc={write_jsonl(tmp_path / 'arc.jsonl', arc_rows(2))}"  # run with the old spellings of two options
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # an import of it now fails
            "import pytest, eval as ev\n"
            f"with pytest.raises(ImportError, match='pip install lm-eval'):\n    ev.PESCLM(ckpt={str(ckpts / 'pesc')!r})\n"
            f"with pytest.raises(SystemExit, match='pip install lm-eval'):\n"
            f"    ev.main(['--ckpt', {str(ckpts / 'pesc')!r}, '--harness', 'mmlu'])\n"
            f"ev.main(['--ckpt', {str(ckpts / 'pesc')!r}, '--task', {task!r}, '--quiet', 'true', '--out', "
            f"{str(tmp_path / 'r.json')!r}, '--dtype', 'float32'])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["n"] == 2
    assert "note: --out is now --results" in p.stderr and "note: --dtype float32 is now spelled fp32" in p.stderr


def test_importing_eval_registers_the_adapter_by_name(tmp_path, ckpts):
    # the harness's usual entry point, in a fresh interpreter: import eval, then name the model
    pytest.importorskip("lm_eval")  # CI installs it (requirements-dev.txt)
    rows = [{"question": q, "choices": ["a llama", "a camel"], "answer": i % 2} for i, q in enumerate("ab")]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    code = ("import json, eval, lm_eval\nfrom lm_eval.tasks import TaskManager\n"
            f"kw = dict(tasks=['tiny_mc'], log_samples=True, task_manager=TaskManager(include_path={str(tmp_path)!r}))\n"
            f"by_name = lm_eval.simple_evaluate(model='pesc', model_args='ckpt={ckpts / 'pesc'},batch_size=2,device=cpu', "
            "**kw)\n"
            f"instance = lm_eval.simple_evaluate(model=eval.PESCLM(ckpt={str(ckpts / 'pesc')!r}, device='cpu'), **kw)\n"
            "print(json.dumps([[s['resps'] for s in r['samples']['tiny_mc']] for r in (by_name, instance)]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    by_name, instance = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(by_name) == 2 and by_name == instance  # the adapter, by name: the same log-likelihoods
