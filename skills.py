"""
Generated instruction skills, for the demo (`python train.py`): made-up words and questions about
them, pretraining text that shows the skills, instruction records that ask for them in the chat
format, and held-out questions on words no instruction record contains, scored by held-out loss
and greedy exact match.
"""

import json
import os
import random

import torch

from data import IGNORE_INDEX
from model import Transformer
from tokenizer import Tokenizer

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def word(rng):
    """A made-up word of 4 to 7 letters, e.g. 'tomek'."""
    w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3))))
    return w + rng.choice(("", rng.choice(CONSONANTS)))


# The skills: name, instruction, answer. The base model is pretrained on text that shows them as
# "Q: ... A: ..." lines; instruction tuning teaches it to answer in the chat format, and is
# checked on words it was never instructed with.
DEMO_TASKS = [
    ("last letter", lambda w: f"Last letter of {w}?", lambda w: w[-1]),
    ("last two", lambda w: f"Last two letters of {w}?", lambda w: w[-2:]),
    ("length", lambda w: f"How many letters in {w}?", lambda w: str(len(w))),
    ("vowel end", lambda w: f"Does {w} end in a vowel?", lambda w: "yes" if w[-1] in VOWELS else "no"),
]


def demo_data(data_dir, seed=0):
    """Write the demo's generated data (PESC/Camelidae JSON) and return the held-out questions.

    pretrain.json: plain-text documents (the `corpus` field) of "Q: ... A: ..." lines.
    sft.json: instruction records (`conversation`), some with a system prompt or two turns.
    The held-out questions use words that no instruction record contains."""
    rng = random.Random(seed)
    words = sorted({word(rng) for _ in range(4000)})
    rng.shuffle(words)
    heldout_words, sft_words = words[:30], words[30:]

    def question(words):
        _, ask, answer = rng.choice(DEMO_TASKS)
        w = rng.choice(words)
        return ask(w), answer(w)

    all_words = words + [word(rng) for _ in range(4000)]  # the base sees more words than the tuning
    # A random run of spaces before each answer: the base must find the word by its content, not
    # at a fixed distance, so that the skill still works once the chat template moves things.
    docs = []
    for _ in range(3000):
        qa = [question(all_words) for _ in range(4)]
        lines = ["Q: %s%sA: %s" % (q, " " * rng.randint(1, 13), a) for q, a in qa]
        docs.append({"corpus": "\n".join(lines), "dataset": "demo-pretrain", "instruction": "", "conversation": []})
    sft = []
    for i in range(4000):
        turns = [dict(zip(("input", "output"), question(sft_words))) for _ in range(1 + (i % 5 == 0))]
        system = "You are a careful assistant." if i % 4 == 0 else ""
        sft.append({"corpus": "", "dataset": "demo-sft", "instruction": system, "conversation": turns})
    heldout = [(name, ask(w), answer(w)) for name, ask, answer in DEMO_TASKS for w in heldout_words]
    os.makedirs(data_dir, exist_ok=True)
    for name, records in (("pretrain.json", docs), ("sft.json", sft)):
        with open(os.path.join(data_dir, name), "w") as f:
            json.dump(records, f)
    return heldout


@torch.no_grad()
def evaluate(ckpt, questions):
    """Held-out loss on the answers, and exact-match accuracy of greedy answers per skill."""
    from sample import generate  # sample.generate: the project's batched generation

    model = Transformer.from_pretrained(ckpt).eval()
    tok = Tokenizer(ckpt)
    total, count = 0.0, 0
    for _, question, answer in questions:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, target_mask = tok.encode_chat(messages)
        targets = torch.tensor([i if m else IGNORE_INDEX for i, m in zip(ids[1:], target_mask[1:])])
        lm_loss = model(torch.tensor([ids[:-1]]), targets[None]).lm_loss
        n = int((targets != IGNORE_INDEX).sum())
        total, count = total + lm_loss.item() * n, count + n
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for _, q, _ in questions]
    rows = generate(model, prompts, 8, temperature=0, stop_ids=tok.stop_ids)
    correct, samples = {}, []
    for (name, question, answer), prompt, row in zip(questions, prompts, rows):
        new = [i for i in row[row >= 0].tolist()[len(prompt):] if i not in tok.stop_ids]
        reply = tok.decode(new).strip()
        if name not in correct:  # one example per skill
            samples.append(f"    {question!r} -> {reply!r}" + ("" if reply == answer else f" (expected {answer!r})"))
        correct.setdefault(name, []).append(reply == answer)
    accuracy = {name: sum(v) / len(v) for name, v in correct.items()}
    return total / count, accuracy, samples
