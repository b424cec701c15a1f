"""
Score a project checkpoint, dense or PESC, on benchmark files on local disk, the way
lm-evaluation-harness scores a Hugging Face model, so the numbers compare with published ones.

    python eval.py --ckpt DIR --task mmlu=data/mmlu/data --shots 5
    python eval.py --ckpt DIR --task gsm8k=gsm8k/test.jsonl,gsm8k/train.jsonl --shots 5 --out r.json
    python eval.py --ckpt DIR --task hellaswag=hs/val.jsonl,hs/train.jsonl --shots 10 --log_samples s.jsonl
    torchrun --standalone --nproc_per_node=2 eval.py --ckpt DIR --task mc=arc/test.jsonl --limit 100
    python eval.py --ckpt DIR --harness mmlu,gsm8k --shots 5    # the harness's own tasks (pip install lm-eval)

--task KIND=PATH[,FEWSHOT_PATH]; nothing is downloaded. The prompts are the harness's defaults
(lm_eval/tasks/{mmlu,hellaswag,arc,gsm8k}; each few-shot example is followed by "\n\n", a
continuation is " " + the answer):
  mmlu       PATH = MMLU's data/ folder: test/SUBJECT_test.csv scored, the first K rows of
             dev/SUBJECT_dev.csv as shots (CSV rows question,A,B,C,D,answer, no header). Prompt:
             "The following are multiple choice questions (with answers) about SUBJECT.\n\n" then
             per question "QUESTION\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:"; choices " A" .. " D".
             --limit counts per subject, as the harness's per-subject tasks do.
  hellaswag  JSONL (activity_label, ctx_a, ctx_b or ctx, endings, label): "LABEL: CTX_A Ctx_b" and
             the endings, cleaned of WikiHow's [bracket] artifacts as the harness does.
  mc         ARC-style JSONL: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
             (the ARC release), {"question", "choices": {"text", "label"}, "answerKey"} (the HF
             one) or {"question", "choices": [..], "answer": index or label}. "Question: Q\nAnswer:".
  gsm8k      JSONL (question, answer ending in "#### N"). "Question: Q\nAnswer:", shots with their
             whole worked answer; greedy until "Question:", "</s>", "<|im_end|>" or a stop token.
             Scored as the harness's exact_match with its two filters: strict-match (the number
             after "#### ") and flexible-extract (the last number in the output).
  ppl        JSONL with a "text" per line, or any other file as one document: token-level and
             per-byte perplexity, windows of the model's context rolled over longer texts.
Shots other than MMLU's come from FEWSHOT_PATH, drawn as the harness's default sampler does
(random.Random(1234), rnd.sample(pool, K) for each document in order; every process draws them
all, so under torchrun they do not depend on the number of processes).

Token boundaries and BOS follow the harness's HF backend with its defaults: the context's trailing
whitespace moves to the continuation, both are encoded together with the tokenizer's BOS and the
continuation is what lies past encode(context); an empty context is the BOS (else EOS) token.
acc takes the choice with the largest summed log-likelihood, acc_norm the largest per character
of the answer. Generated code is never executed: there is no HumanEval / MBPP execution here.

--harness TASKS runs the harness's own task definitions through eval.PESCLM, which importing
this module registers with the harness as "pesc" whenever lm-eval is installed (so
`import eval; lm_eval.simple_evaluate(model="pesc", model_args="ckpt=DIR", ...)` works); those
tasks name datasets on the Hugging Face hub, which the harness loads from its cache or the hub,
unless --include_path gives task YAMLs over local files.

Requests are batched, longest first; the continuations of one prompt share its computation
(the prompt is prefilled once into the KV cache, each continuation runs after it). For PESC checkpoints
the share of routing of each expert in each layer is reported per task (the paper's
expert-specialisation analysis), with a heatmap beside --results (PNG; needs matplotlib).
"""

import argparse
import csv
import io
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import moe
from files import checkpoint_fingerprint, write_atomic
from model import Transformer
from sample import generate
from tokenizer import Tokenizer

try:  # optional: only the harness adapter (eval.PESCLM, --harness) needs lm-evaluation-harness
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    LM = register_model = None

KINDS = ("mmlu", "hellaswag", "mc", "gsm8k", "ppl")
FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed
MMLU_LETTERS = ("A", "B", "C", "D")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # removed from prediction and reference
INVALID = "[invalid]"  # the harness's fallback when a filter finds no number


class TaskError(ValueError):
    """A task file that cannot be read as its kind: the message names the file and line."""


# -----------------------------------------------------------------------------
# Tasks: local files -> items with the exact prompt text


@dataclass
class Item:
    doc_id: int
    prompt: str  # the exact context text the model conditions on
    choices: list = field(default_factory=list)  # answer texts (multiple choice)
    gold: int = None  # index of the right choice
    target: str = None  # reference answer (gsm8k) or the document (ppl)


@dataclass
class Task:
    name: str
    kind: str  # "mc", "gen" or "ppl": how it is scored
    items: list


def read_jsonl(path):
    """(line number, object) of each non-blank line; a bad line is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TaskError(f"{path}: {e.strerror}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def need(row, keys, path, n):
    """The values of keys in a JSONL object, or an error naming the missing key and the line."""
    if not isinstance(row, dict):
        raise TaskError(f"{path}:{n}: expected a JSON object")
    missing = [k for k in keys if k not in row]
    if missing:
        raise TaskError(f"{path}:{n}: missing key {missing[0]!r}")
    return [row[k] for k in keys]


def draw_shots(docs, pool, shots, path):
    """The few-shot examples of each doc, as the harness's default sampler draws them."""
    if shots and pool is None:
        raise TaskError(f"{path}: --shots {shots} needs a few-shot file: --task KIND={path},FEWSHOT_PATH")
    if shots > len(pool or ()):
        raise TaskError(f"--shots {shots}: the few-shot file has only {len(pool)} examples")
    rnd = random.Random(FEWSHOT_SEED)
    return [rnd.sample(pool, shots) if shots else [] for _ in docs]


def multiple_choice_prompt(query, shots):
    """Few-shot examples "QUERY ANSWER\n\n" then the query; shots are (query, answer) pairs."""
    return "".join(f"{q} {a}\n\n" for q, a in shots) + query


def read_mmlu_csv(path):
    """[(question, [A, B, C, D], gold index)] of an MMLU CSV file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise TaskError(f"{path}: {e.strerror}") from None
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) != 6:
            raise TaskError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        if row[5].strip() not in MMLU_LETTERS:
            raise TaskError(f"{path}:{n}: answer {row[5]!r} is not one of the choices A, B, C, D")
        out.append((row[0], row[1:5], MMLU_LETTERS.index(row[5].strip())))
    return out


def load_mmlu(folder, shots, limit):
    def query(question, options):
        lines = [question.strip()] + [f"{l}. {o}" for l, o in zip(MMLU_LETTERS, options)]
        return "\n".join(lines) + "\nAnswer:"

    test_dir, dev_dir = os.path.join(folder, "test"), os.path.join(folder, "dev")
    if not os.path.isdir(test_dir):
        raise TaskError(f"{folder}: no test/ folder (PATH is MMLU's data/ folder)")
    subjects = sorted(f[:-len("_test.csv")] for f in os.listdir(test_dir) if f.endswith("_test.csv"))
    if not subjects:
        raise TaskError(f"{test_dir}: no SUBJECT_test.csv files")
    items = []
    for subject in subjects:
        dev_file = os.path.join(dev_dir, f"{subject}_dev.csv")
        dev = read_mmlu_csv(dev_file) if shots else []
        if shots > len(dev):
            raise TaskError(f"{dev_file}: --shots {shots} but the dev split has only {len(dev)} questions")
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        examples = [(query(q, o), MMLU_LETTERS[g]) for q, o, g in dev[:shots]]
        for q, options, gold in read_mmlu_csv(os.path.join(test_dir, f"{subject}_test.csv"))[:limit]:
            items.append(Item(len(items), head + multiple_choice_prompt(query(q, options), examples),
                              list(MMLU_LETTERS), gold))
    return items


def hellaswag_clean(text):
    """The harness's hellaswag preprocess: strip, WikiHow's " [title]" -> ". ", drop [brackets]."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_doc(row, path, n):
    (endings, label) = need(row, ["endings", "label"], path, n)
    if "ctx_a" in row and "ctx_b" in row:
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    else:
        (ctx,) = need(row, ["ctx"], path, n)
    query = hellaswag_clean(f"{row['activity_label']}: {ctx}" if "activity_label" in row else ctx)
    return query, [hellaswag_clean(e) for e in endings], gold_index(label, len(endings), path, n)


def gold_index(label, n_choices, path, n, labels=None):
    """The index of the right choice: an int (or digit string) index, or one of labels."""
    if labels is not None and label in labels:
        return labels.index(label)
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_choices:
        raise TaskError(f"{path}:{n}: answer {label!r} is not among the {n_choices} choices")
    return label


def arc_doc(row, path, n):
    """(question, choice texts, gold index) of an ARC-style or generic multiple-choice row."""
    (question,) = need(row, ["question"], path, n)
    if isinstance(question, dict):  # the ARC release: question.stem, question.choices
        (choices,) = need(question, ["choices"], path, n)
        question = question.get("stem")
    else:
        (choices,) = need(row, ["choices"], path, n)
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and choices and isinstance(choices[0], dict):
        texts, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
    else:
        texts, labels = choices, None
    if not isinstance(question, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TaskError(f"{path}:{n}: expected a question and a list of choice texts")
    answer = row.get("answerKey", row.get("answer"))
    if answer is None:
        raise TaskError(f"{path}:{n}: missing key 'answerKey' (or 'answer')")
    return f"Question: {question}\nAnswer:", texts, gold_index(answer, len(texts), path, n, labels)


def load_choices(path, fewshot_path, shots, limit, read_doc):
    docs = [read_doc(row, path, n) for n, row in read_jsonl(path)][:limit]
    pool = [read_doc(row, fewshot_path, n) for n, row in read_jsonl(fewshot_path)] if fewshot_path else None
    items = []
    for i, ((query, choices, gold), examples) in enumerate(zip(docs, draw_shots(docs, pool, shots, path))):
        prompt = multiple_choice_prompt(query, [(q, c[g]) for q, c, g in examples])
        items.append(Item(i, prompt, choices, gold))
    return items


def load_gsm8k(path, fewshot_path, shots, limit):
    def read(file):
        out = []
        for n, row in read_jsonl(file):
            question, answer = need(row, ["question", "answer"], file, n)
            if "####" not in answer:
                raise TaskError(f"{file}:{n}: the answer does not end in '#### N'")
            out.append((f"Question: {question}\nAnswer:", answer))
        return out

    docs = read(path)[:limit]
    pool = read(fewshot_path) if fewshot_path else None
    return [Item(i, multiple_choice_prompt(q, examples), target=answer)
            for i, ((q, answer), examples) in enumerate(zip(docs, draw_shots(docs, pool, shots, path)))]


def load_ppl(path, limit):
    if path.endswith(".jsonl"):
        texts = [need(row, ["text"], path, n)[0] for n, row in read_jsonl(path)]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                texts = [f.read()]
        except (OSError, UnicodeDecodeError) as e:
            raise TaskError(f"{path}: {e}") from None
    return [Item(i, "", target=t) for i, t in enumerate(texts[:limit]) if t]


def load_task(spec, shots, limit):
    """--task KIND=PATH[,FEWSHOT_PATH] -> a Task."""
    kind, _, paths = spec.partition("=")
    if kind not in KINDS or not paths:
        raise TaskError(f"--task {spec!r}: expected KIND=PATH with KIND one of {', '.join(KINDS)}")
    path, _, fewshot = paths.partition(",")
    fewshot = fewshot or None
    stem = os.path.splitext(os.path.basename(path))[0]
    if kind == "mmlu":
        task = Task("mmlu", "mc", load_mmlu(path, shots, limit))
    elif kind == "hellaswag":
        task = Task("hellaswag", "mc", load_choices(path, fewshot, shots, limit, hellaswag_doc))
    elif kind == "mc":
        task = Task(f"mc:{stem}", "mc", load_choices(path, fewshot, shots, limit, arc_doc))
    elif kind == "gsm8k":
        task = Task("gsm8k", "gen", load_gsm8k(path, fewshot, shots, limit))
    else:
        task = Task(f"ppl:{stem}", "ppl", load_ppl(path, limit))
    if not task.items:
        raise TaskError(f"{path}: no documents to score")
    return task


# -----------------------------------------------------------------------------
# Token boundaries (the harness's HF backend with its defaults)


def prefix_id(tokenizer):
    """The token an empty context becomes: BOS, or EOS for tokenizers without one (Qwen)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as the harness's _encode_pair splits them."""
    if not context:
        cont = tokenizer.encode(continuation)
        first = prefix_id(tokenizer)
        return ([first], cont) if cont[:1] != [first] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:  # "Answer: " + "B" is scored as "Answer:" + " B", the way the text was tokenized in training
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def rolling_windows(ids, first_id, max_len):
    """(context, predicted) windows that predict every id of ids exactly once.

    The harness's get_rolling_token_windows + make_disjoint_window with context_len 1: the first
    window predicts up to max_len ids after first_id, each later one the next up to max_len ids
    after as much of the preceding text as still fits in max_len + 1 tokens."""
    if not ids:
        return []
    n = min(max_len, len(ids))
    windows, done = [([first_id], ids[:n])], n
    while done < len(ids):
        n = min(len(ids) - done, max_len)
        end = done + n
        windows.append((ids[end - max_len - 1:end - n], ids[done:end]))
        done = end
    return windows


# -----------------------------------------------------------------------------
# Scoring: log-likelihoods in batches of packed rows


class Progress:
    """A line on stderr with items done, items/s and the ETA, redrawn at most twice a second."""

    def __init__(self, label, total, enabled=True, unit="items"):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled and total > 0
        self.done, self.start, self.shown = 0, time.perf_counter(), 0.0

    def update(self, n):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.shown > 0.5 or self.done >= self.total):
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            end = "\n" if self.done >= self.total else ""
            print(f"\r{self.label}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f} s ",
                  end=end, file=sys.stderr, flush=True)


def plan_rows(requests, max_len):
    """Rows of (context, continuations, (request index, index of its first continuation)) from
    requests (context, [continuation, ...]).

    A row holds all continuations of a context when the longest fits the model with it;
    otherwise each continuation gets its own row with the context cut from the left, as the
    harness cuts (context + continuation)[-(max_len + 1):]."""
    rows = []
    for r, (ctx, conts) in enumerate(requests):
        if any(len(c) == 0 for c in conts):
            raise ValueError(f"request {r}: an empty continuation (nothing to score)")
        if len(ctx) + max(len(c) for c in conts) <= max_len + 1:
            rows.append((ctx, conts, (r, 0)))
            continue
        for j, c in enumerate(conts):
            if len(c) > max_len:
                raise ValueError(f"request {r}: a continuation of {len(c)} tokens is longer than the model's "
                                 f"context of {max_len}")
            rows.append((ctx[-(max_len + 1 - len(c)):], [c], (r, j)))
    return rows


def row_logits(model, rows):
    """Per row, per continuation: the (len(continuation), vocab) logits that predict its ids.

    One prefill of the batch's contexts (right-padded) fills the KV cache; then each
    continuation but its last id (the last one is only predicted) runs in the slots after the
    contexts, at the positions right after its own context, so it attends to its context and its
    own earlier ids: the context is computed once for all its continuations. Later continuations
    overwrite earlier ones' slots, and what an earlier, longer one leaves lies at later positions,
    which no query sees. Padding is a document of its own (1), invisible to real tokens (0)."""
    device = model.output.weight.device
    B = len(rows)
    C = max(len(ctx) for ctx, _, _ in rows)
    M = max(len(c) - 1 for _, conts, _ in rows for c in conts)
    n_conts = max(len(conts) for _, conts, _ in rows)
    idx = torch.zeros(B, C, dtype=torch.long)
    doc = torch.ones(B, C, dtype=torch.long)
    for b, (ctx, _, _) in enumerate(rows):
        idx[b, :len(ctx)], doc[b, :len(ctx)] = torch.tensor(ctx), 0
    positions = torch.arange(C).expand(B, C)
    model.setup_cache(B, C + M)
    try:
        logits = model(idx.to(device), input_pos=torch.arange(C, device=device), positions=positions.to(device),
                       doc_ids=doc.to(device), valid=(doc == 0).to(device))[0]
        last = logits[torch.arange(B), torch.tensor([len(ctx) - 1 for ctx, _, _ in rows])]  # (B, vocab)
        out = [[last[b:b + 1]] * len(conts) for b, (_, conts, _) in enumerate(rows)]
        for j in range(n_conts):
            m = max((len(conts[j]) - 1 for _, conts, _ in rows if j < len(conts)), default=0)
            if m == 0:
                continue
            idx = torch.zeros(B, m, dtype=torch.long)
            doc = torch.ones(B, m, dtype=torch.long)
            positions = torch.stack([len(ctx) + torch.arange(m) for ctx, _, _ in rows])
            for b, (_, conts, _) in enumerate(rows):
                if j < len(conts) and len(conts[j]) > 1:
                    idx[b, :len(conts[j]) - 1], doc[b, :len(conts[j]) - 1] = torch.tensor(conts[j][:-1]), 0
            step = model(idx.to(device), input_pos=torch.arange(C, C + m, device=device),
                         positions=positions.to(device), doc_ids=doc.to(device), valid=(doc == 0).to(device))[0]
            for b, (_, conts, _) in enumerate(rows):
                if j < len(conts):
                    out[b][j] = torch.cat([last[b:b + 1], step[b, :len(conts[j]) - 1]])
    finally:
        model.clear_cache()
    return out


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16, max_len=None, progress=None):
    """[(log-likelihood, greedy)] per continuation of each request (context ids, [continuation ids]).

    greedy: every continuation id is the argmax of its prediction. Rows run in batches, longest
    first (as the harness sorts); a context is computed once for all its continuations."""
    max_len = max_len or model.config.max_seq_len
    device = model.output.weight.device
    rows = sorted(plan_rows(requests, max_len), key=lambda r: -(len(r[0]) + sum(len(c) - 1 for c in r[1])))
    results = [[None] * len(conts) for _, conts in requests]
    pending = [0] * len(requests)  # rows of each request still to run
    for _, _, (r, _) in rows:
        pending[r] += 1
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        finished = 0
        for (_, conts, (r, first)), per_cont in zip(chunk, row_logits(model, chunk)):
            for j, (ids, logits) in enumerate(zip(conts, per_cont), first):
                logprobs = F.log_softmax(logits.float(), dim=-1)  # (len(ids), vocab)
                ids_t = torch.tensor(ids, device=device)
                ll = logprobs.gather(-1, ids_t[:, None]).sum().item()
                results[r][j] = (ll, bool((logprobs.argmax(-1) == ids_t).all()))
            pending[r] -= 1
            finished += pending[r] == 0
        if progress is not None:
            progress.update(finished)
    return results


def rolling_loglikelihood(model, tokenizer, texts, batch_size=16, max_len=None, show_progress=False, label="ppl"):
    """[(log-likelihood, tokens)] of each whole text, scored in rolling windows.

    The ids are the tokenizer's own encoding with its BOS, each predicted once, the first after
    the BOS (else EOS) token, as the harness's loglikelihood_rolling does (for a Llama tokenizer
    it thus also scores the BOS after the BOS)."""
    max_len = max_len or model.config.max_seq_len
    encoded = [tokenizer.encode(t, bos=True) for t in texts]
    windows = [rolling_windows(ids, prefix_id(tokenizer), max_len) for ids in encoded]
    flat = [(ctx, [pred]) for w in windows for ctx, pred in w]
    progress = Progress(label, len(flat), show_progress, unit="windows")
    scores = iter(loglikelihoods(model, flat, batch_size, max_len, progress))
    return [(sum(next(scores)[0][0] for _ in w), len(ids)) for ids, w in zip(encoded, windows)]


# -----------------------------------------------------------------------------
# Generation: greedy, batched with the KV cache, cut at stop strings


def cut_at_stops(text, stops):
    """The text before the first occurrence of each stop string (the harness's post-processing)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@torch.no_grad()
def generate_until(model, tokenizer, prompts, stops, max_new_tokens=256, batch_size=16, progress=None):
    """Greedy continuations of prompts (texts), each cut at its first stop string or stop token.

    Prompts are encoded with BOS and cut from the left to leave max_new_tokens of room; a batch
    ends once every row has produced a stop token or contains a stop string."""
    if max_new_tokens >= model.config.max_seq_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.config.max_seq_len}")
    room = model.config.max_seq_len - max_new_tokens
    encoded = [tokenizer.encode(p, bos=True)[-room:] for p in prompts]
    stop_ids = set(tokenizer.stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [None] * len(prompts)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        new = [[] for _ in chunk]
        live = torch.ones(len(chunk), dtype=torch.bool)  # rows still generating, for the routing counts

        def on_token(next_ids):
            for b, t in enumerate(next_ids.tolist()):
                if live[b]:
                    if t in stop_ids:
                        live[b] = False
                    else:
                        new[b].append(t)
                        text = tokenizer.decode(new[b][-64:])  # a stop string is short: look at the tail
                        live[b] = not any(s in text for s in stops)
            return not bool(live.any())

        def decode_step(model, x, input_pos, positions):
            valid = live.to(x.device)[:, None]  # finished rows run on: leave them out of the routing counts
            return model(x, input_pos=input_pos, positions=positions, valid=valid)[0][:, -1]

        generate(model, [encoded[j] for j in chunk], max_new_tokens, temperature=0, stop_ids=sorted(stop_ids),
                 vocab_size=tokenizer.vocab_size, on_token=on_token, decode_fn=decode_step)
        for b, j in enumerate(chunk):
            out[j] = cut_at_stops(tokenizer.decode(new[b]), stops)
        if progress is not None:
            progress.update(len(chunk))
    return out


# -----------------------------------------------------------------------------
# Metrics


def argmax(values):
    """Index of the first largest value (numpy's argmax, which the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_predictions(lls, choices):
    """(acc prediction, acc_norm prediction): by summed log-likelihood and per character."""
    return argmax(lls), argmax([ll / len(c) for ll, c in zip(lls, choices)])


def gsm8k_strict(text):
    """The number after "#### " (the first such), or "[invalid]"."""
    found = GSM8K_STRICT.findall(text)
    return found[0].strip() if found else INVALID


def gsm8k_flexible(text):
    """The last number in text (at least two characters of [$0-9.,], or an integer), or "[invalid]"."""
    found = GSM8K_FLEXIBLE.findall(text)
    if not found:
        return INVALID
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else INVALID


def gsm8k_normalize(text):
    """The harness's exact_match for gsm8k: drop commas, "$", everything up to "#### ", a final
    period; lower case."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def mean_stderr(values):
    """(mean, standard error of the mean) with the sample standard deviation, as the harness."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_task(task, outcomes):
    """(metric rows, per-item sample dicts) of a task from the outcome of each item."""
    rows, samples = [], []

    def add(metric, values, stderr=True):
        mean, se = mean_stderr(values)
        rows.append({"task": task.name, "metric": metric, "value": mean, "stderr": se if stderr else None,
                     "n": len(task.items)})

    if task.kind == "mc":
        acc, acc_norm = [], []
        for item, lls in zip(task.items, outcomes):
            pred, pred_norm = choice_predictions([ll for ll, _ in lls], item.choices)
            acc.append(float(pred == item.gold))
            acc_norm.append(float(pred_norm == item.gold))
            samples.append(dict(prompt=item.prompt, choices=item.choices, loglikelihoods=[ll for ll, _ in lls],
                                prediction=pred, target=item.gold))
        add("acc", acc)
        add("acc_norm", acc_norm)
    elif task.kind == "gen":
        strict, flexible = [], []
        for item, text in zip(task.items, outcomes):
            ref = gsm8k_normalize(item.target)
            pred = {"strict-match": gsm8k_strict(text), "flexible-extract": gsm8k_flexible(text)}
            strict.append(float(gsm8k_normalize(pred["strict-match"]) == ref))
            flexible.append(float(gsm8k_normalize(pred["flexible-extract"]) == ref))
            samples.append(dict(prompt=item.prompt, choices=[], generation=text, prediction=pred, target=item.target))
        add("exact_match,strict-match", strict)
        add("exact_match,flexible-extract", flexible)
    else:
        total_ll = sum(ll for ll, _ in outcomes)
        tokens = sum(n for _, n in outcomes)
        n_bytes = sum(len(item.target.encode("utf-8")) for item in task.items)
        for metric, value in (("token_perplexity", math.exp(-total_ll / tokens)),
                              ("byte_perplexity", math.exp(-total_ll / n_bytes)),
                              ("bits_per_byte", -total_ll / n_bytes / math.log(2))):
            rows.append({"task": task.name, "metric": metric, "value": value, "stderr": None, "n": len(task.items)})
        for item, (ll, n) in zip(task.items, outcomes):
            samples.append(dict(prompt=item.prompt, choices=[], loglikelihoods=[ll], prediction=None,
                                target=item.target, tokens=n))
    for item, s in zip(task.items, samples):
        s["task"], s["doc_id"] = task.name, item.doc_id
    return rows, samples


# -----------------------------------------------------------------------------
# The experts per task


@contextmanager
def routing_counts(model):
    """Yields a (layers, experts) tensor summing the expert load the model reports (its output's
    expert_load: real tokens only) over every forward inside the block; None for a dense model."""
    layers = moe.pesc_layers(model)
    if not layers:
        yield None
        return
    counts = torch.zeros(len(layers), model.config.moe.num_experts, dtype=torch.float64)

    def add(module, inputs, output):
        counts.add_(output.expert_load.to("cpu", torch.float64))

    handle = model.register_forward_hook(add)
    try:
        yield counts
    finally:
        handle.remove()


def routing_share(counts):
    """Per layer, each expert's share of the (token, slot) assignments, as lists."""
    return (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()


def plot_routing(shares, path, title=""):
    """Heatmaps of the share of routing per layer (rows) and expert (columns), one panel per entry
    of shares ({name: (layers, experts) nested lists}), written to path (PNG). Needs matplotlib,
    an optional dependency: without it nothing is drawn and a note says so; returns whether drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        cli.note(f"{path} not drawn: the routing heatmaps need matplotlib (pip install matplotlib)")
        return False
    names = list(shares)
    L, E = len(shares[names[0]]), len(shares[names[0]][0])
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.45 * E * len(names), 1.4 + 0.4 * L), squeeze=False)
    peak = max(max(max(row) for row in shares[n]) for n in names) or 1.0
    for ax, name in zip(axes[0], names):
        image = ax.imshow(shares[name], cmap="Blues", vmin=0, vmax=peak, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        ax.set_ylabel("layer" if ax is axes[0][0] else "")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of routed tokens")
    if title:
        fig.suptitle(title, fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return True


# -----------------------------------------------------------------------------
# Running tasks, one or several processes


def run_task(model, tokenizer, task, args, rank=0, world=1):
    """(outcome per item, in item order, routing counts) of a task; items split across ranks."""
    mine = task.items[rank::world]
    progress = Progress(task.name, len(mine), enabled=rank == 0 and not args.quiet)
    with routing_counts(model) as counts:
        if task.kind == "mc":
            requests = []
            for item in mine:  # the context ids do not depend on the choice: one request per item
                pairs = [encode_pair(tokenizer, item.prompt, " " + c) for c in item.choices]
                requests.append((pairs[0][0], [cont for _, cont in pairs]))
            outcomes = loglikelihoods(model, requests, args.batch_size, progress=progress)
        elif task.kind == "gen":
            outcomes = generate_until(model, tokenizer, [item.prompt for item in mine],
                                      list(GSM8K_STOP) + [tokenizer.decode([tokenizer.eos_id])],
                                      args.max_new_tokens, args.batch_size, progress)
        else:
            outcomes = rolling_loglikelihood(model, tokenizer, [item.target for item in mine], args.batch_size,
                                             show_progress=progress.enabled, label=task.name)
    if world > 1:  # gather: rank r scored items r, r + world, ...
        gathered = [None] * world
        dist.all_gather_object(gathered, outcomes)
        outcomes = [gathered[i % world][i // world] for i in range(len(task.items))]
        if counts is not None:  # on the model's device: NCCL reduces CUDA tensors only
            summed = counts.to(model.output.weight.device)
            dist.all_reduce(summed)
            counts = summed.cpu()
    return outcomes, counts


def table(rows):
    lines = ["| task | shots | metric | value | stderr | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['shots']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} |")
    return "\n".join(lines)


def load(ckpt, device, dtype):
    model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    tokenizer = Tokenizer(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer


def evaluate(args):
    """Run every --task; on rank 0 print the table and write --results, its heatmaps, --log_samples."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = cli.resolve_device(args.device)
    if world > 1:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank = 0
    try:
        tasks = [load_task(spec, args.shots, args.limit) for spec in args.task]
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TaskError(f"--task: {dup[0]} is given twice")
        model, tokenizer = load(args.ckpt, device, cli.resolve_dtype(args.dtype, device))
        rows, samples, routing = [], [], {}
        for task in tasks:
            t0 = time.perf_counter()
            outcomes, counts = run_task(model, tokenizer, task, args, rank, world)
            task_rows, task_samples = score_task(task, outcomes)
            for r in task_rows:
                r["shots"] = 0 if task.kind == "ppl" else args.shots
            rows += task_rows
            samples += task_samples
            if counts is not None:
                routing[task.name] = {"share": routing_share(counts), "assignments": counts.sum(-1).tolist()}
            if rank == 0 and not args.quiet:
                print(f"{task.name}: {len(task.items)} items in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if rank == 0:
            write_results(args, rows, samples, routing)
    finally:
        if world > 1:
            dist.destroy_process_group()


def write_results(args, rows, samples, routing):
    print(table(rows))
    if args.results:
        result = {"results": rows, "routing": routing,
                  "checkpoint": {"path": os.path.abspath(args.ckpt), "fingerprint": checkpoint_fingerprint(args.ckpt)},
                  "options": vars(args), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(args.results, json.dumps(result, indent=2) + "\n")
        if routing:
            plot_routing({name: r["share"] for name, r in routing.items()},
                         os.path.splitext(args.results)[0] + ".routing.png",
                         f"expert routing per task: {os.path.basename(os.path.abspath(args.ckpt))}")
    if args.log_samples:
        write_atomic(args.log_samples, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


# -----------------------------------------------------------------------------
# The lm-evaluation-harness adapter (optional: `pip install lm-eval`)


class PESCLM(LM or object):
    """The harness's LM over a project checkpoint, registered as "pesc" when this module is
    imported with lm-eval installed. model_args: ckpt=DIR, and batch_size, device, dtype (fp32,
    bf16, fp16, auto), max_length."""

    def __init__(self, ckpt, batch_size=16, device="auto", dtype="auto", max_length=None, max_batch_size=None):
        if LM is None:
            raise ImportError("eval.PESCLM and --harness need lm-evaluation-harness: pip install lm-eval")
        super().__init__()
        self._device = cli.resolve_device(device or "auto")
        self.model, self.tokenizer = load(ckpt, self._device, cli.resolve_dtype(dtype or "auto", self._device))
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)

    def loglikelihood(self, requests, disable_tqdm=False):
        contexts, order = {}, []  # one request per distinct context: its continuations share a row
        for req in requests:
            ctx_ids, cont_ids = encode_pair(self.tokenizer, *req.args)
            key = tuple(ctx_ids)
            conts = contexts.setdefault(key, [])
            order.append((key, len(conts)))
            conts.append(cont_ids)
        keys = list(contexts)
        scores = loglikelihoods(self.model, [(list(k), contexts[k]) for k in keys], self.batch_size,
                                self.max_length, Progress("loglikelihood", len(keys), not disable_tqdm))
        by_key = dict(zip(keys, scores))
        return [by_key[k][j] for k, j in order]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        texts = [req.args[0] for req in requests]
        return [ll for ll, _ in rolling_loglikelihood(self.model, self.tokenizer, texts, self.batch_size,
                                                      self.max_length, not disable_tqdm, "loglikelihood_rolling")]

    def generate_until(self, requests, disable_tqdm=False):
        groups = {}  # requests with the same generation options run together
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tokenizer.decode([self.tokenizer.eos_id])
            key = (tuple(until + ([eos] if eos not in until else [])), int(kwargs.get("max_gen_toks", 256)))
            groups.setdefault(key, []).append((i, context))
        out = [None] * len(requests)
        progress = Progress("generate_until", len(requests), not disable_tqdm)
        for (stops, max_new), members in groups.items():
            texts = generate_until(self.model, self.tokenizer, [c for _, c in members], list(stops), max_new,
                                   self.batch_size, progress)
            for (i, _), text in zip(members, texts):
                out[i] = text
        return out


if register_model is not None:
    try:
        register_model("pesc")(PESCLM)
    except ValueError:  # this file imported a second time (as __main__ and as eval): the first stays
        pass


def run_harness(args):
    """--harness TASKS: the harness's own task definitions, run through PESCLM."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise SystemExit("--harness needs lm-evaluation-harness: pip install lm-eval") from None
    lm = PESCLM(ckpt=args.ckpt, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.harness.split(","), num_fewshot=args.shots,
                                      limit=args.limit, log_samples=bool(args.log_samples),
                                      task_manager=TaskManager(include_path=args.include_path))
    print(make_table(results))
    if args.results:
        out = {"results": results["results"], "configs": results.get("configs"),
               "checkpoint": {"path": os.path.abspath(args.ckpt), "fingerprint": checkpoint_fingerprint(args.ckpt)},
               "options": vars(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(args.results, json.dumps(out, indent=2, default=str) + "\n")
    if args.log_samples:
        lines = [json.dumps({"task": task, **s}, default=str) + "\n" for task, per in results["samples"].items()
                 for s in per]
        write_atomic(args.log_samples, "".join(lines))


# -----------------------------------------------------------------------------
# The command line

RENAMED = {"--out": "--results"}  # old option names that still work, with a note


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a project checkpoint on local benchmark files.",
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint directory: config.json, safetensors, tokenizer")
    p.add_argument("--task", action="append", default=[], metavar="KIND=PATH[,FEWSHOT_PATH]",
                   help=f"KIND one of {', '.join(KINDS)}; repeat for several tasks")
    p.add_argument("--harness", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--include_path", default=None, help="--harness: a folder of extra task YAMLs")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generation tasks (the harness's max_gen_toks)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--batch_size", type=int, default=16, help="rows per forward (per process)")
    p.add_argument("--results", default=None, help="results JSON file; the routing heatmaps go beside it")
    p.add_argument("--log_samples", default=None, help="JSONL with one line per scored document")
    cli.add_device_dtype(p)
    p.add_argument("--quiet", default=False, **cli.FLAG, help="no progress lines")
    args = cli.parse(p, argv, RENAMED)
    if bool(args.task) == bool(args.harness):
        p.error("give --task (local files) or --harness (the harness's tasks), one of the two")
    if args.shots < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        p.error("--shots must be >= 0; --batch_size, --max_new_tokens and --limit >= 1")
    if args.harness:
        return run_harness(args)
    try:
        evaluate(args)
    except TaskError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
