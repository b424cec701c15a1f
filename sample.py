"""
Sample from a project checkpoint, dense or PESC: text completion or chat, streamed as it comes.

    python sample.py --ckpt DIR --prompt "Once upon a time" --temperature 0.8 --top_p 0.95
    python sample.py --ckpt DIR --prompt FILE:question.txt --chat --show_experts
    python sample.py --ckpt DIR --chat          # a conversation, when stdin is a terminal

From Python, `generate(model, idx, max_new_tokens, ...)` runs a batch of prompts of any lengths
through the model's KV cache: the prompts are left-padded to one length, every row gets its own
RoPE positions, and the prompt is one document that the padding is not part of
(model.attention_mask), so each row computes what it would alone. One prefill pass fills the
cache, then one token per step (the step --compile compiles).
"""

import argparse
import sys
import time

import torch

import cli
import moe
from model import Transformer
from tokenizer import TEMPLATES, Tokenizer

# -----------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row: logits (B, vocab) -> ids (B,).

    temperature 0 is greedy (argmax). top_k keeps the k largest logits (all of a tie at the
    k-th); top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays). Both filter after the temperature, in that order,
    as Hugging Face does; generator makes the draw reproducible."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # (B, vocab) probability of the better-ranked tokens
        drop_sorted = mass_above >= top_p  # the set already reached top_p without this token
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # never picks a 0 probability


# -----------------------------------------------------------------------------
# Generation with the KV cache


def decode_step(model, x, input_pos, positions):
    """One token per row through the cached model: x (B, 1) -> next-token logits (B, vocab).

    This is what --compile compiles: its shapes stay the same from one token to the next."""
    return model(x, input_pos=input_pos, positions=positions).logits[:, -1]


def compile_decode_step(device, **options):
    """decode_step compiled as one graph; on CUDA replayed as a CUDA graph (reduce-overhead), so
    a token costs one launch instead of hundreds, which is how gpt-fast reaches the memory
    bandwidth bound. Pair it with generate(..., static_cache=True) so its shapes stay put."""
    if torch.device(device).type == "cuda":
        options.setdefault("mode", "reduce-overhead")
    return torch.compile(decode_step, fullgraph=True, **options)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=None, *,
             generator=None, pad_id=-1, vocab_size=None, on_token=None, decode_fn=decode_step,
             static_cache=False):
    """Prompt plus up to max_new_tokens sampled ids, as a (B, P + n) tensor, n <= max_new_tokens.

    idx: a (B, T) or (T,) tensor of prompts of one length, or a list of 1-D prompts (tensors or
    lists of ids) of any lengths, which are left-padded to the longest one, P tokens. A row is
    finished once it samples one of stop_ids (kept in the output); generation ends when every
    row is finished or after max_new_tokens. The left padding and every slot after a row's stop
    id hold pad_id: by default -1, which is no token, so `row[row >= 0]` is exactly that row's
    prompt and its generated ids.
    Sampling is sample_next's (temperature 0 = greedy). vocab_size: sample only ids below it
    (for a tokenizer smaller than the model's padded embedding). on_token(ids) is called with
    each step's (B,) new ids (pad_id for finished rows), e.g. to stream them; when it returns
    True, generation ends after that step. decode_fn is the one-token step: decode_step or
    compile_decode_step's. static_cache rounds the cache up to a power of two (at least 256
    slots), so that a compiled step sees the same shapes from one call to the next (a chat's
    turns) and is not compiled again for every length.
    Put the model in eval mode first (PESC adapters have dropout). The model's KV cache is set
    up for B rows of P + max_new_tokens slots and removed on return.
    """
    if torch.is_tensor(idx) and idx.dim() == 1:
        idx = idx[None]
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in idx]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (start it with the BOS token)")
    device = model.output.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new_tokens  # cache slots: the prompt, then one per new token
    if S > model.config.max_seq_len:
        raise ValueError(f"generate: prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {S} "
                         f"exceeds the model's max_seq_len {model.config.max_seq_len}")

    tokens = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):P] = p.to(device)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,) padding on the left
    C = max(256, 1 << (S - 1).bit_length()) if static_cache else S  # cache slots, C >= S
    slots = torch.arange(C, device=device)  # C wide, so a step's slices keep their strides too
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, C) RoPE position of each slot
    real = slots[None, :P] >= pad[:, None]  # (B, P) prompt tokens, not padding

    stop = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    model.setup_cache(B, C)
    try:
        prompt = torch.where(real, tokens[:, :P], 0)  # padding enters as id 0
        # the prompt is document 0; each padding slot a document of its own, which sees only itself
        doc_ids = torch.where(real, 0, -1 - slots[:P])
        logits = model(prompt, input_pos=slots[:P], positions=positions[:, :P], doc_ids=doc_ids, valid=real).logits
        logits = logits[:, -1]  # (B, vocab): the last column is a real token in every row
        end = P
        for t in range(P, S):
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            next_ids = torch.where(finished, pad_id, next_ids)
            tokens[:, t] = next_ids
            finished |= torch.isin(next_ids, stop)
            end = t + 1
            if on_token is not None and on_token(next_ids):
                break  # the caller has what it needs (eval.py: a stop string in every row)
            if t + 1 == S or (len(stop) and bool(finished.all())):
                break
            x = torch.where(finished, 0, next_ids)[:, None]  # finished rows run on, ignored
            logits = decode_fn(model, x, slots[t:t + 1], positions[:, t:t + 1])  # document 0
    finally:
        model.clear_cache()
    return tokens[:, :end]


# -----------------------------------------------------------------------------
# What the command line prints: streamed text, the experts of each token


class TextStream:
    """Writes the text of ids as they arrive, holding back a UTF-8 character cut in two."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids, self.written = [], 0

    def put(self, id):
        self.ids.append(id)
        # The whole answer is decoded each time: a token's text can depend on its neighbours
        # (SentencePiece's leading space), and a byte token may end mid-character, which
        # decode() shows as U+FFFD until the rest of the character arrives.
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self):
        self._write(self.tokenizer.decode(self.ids))  # whatever is left, a broken character too

    def _write(self, text):
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


def record_experts(model):
    """Hook every PESC router to keep the top-k experts it chose in the last forward.

    Returns a list with one entry per layer, refreshed on every forward: (B * T, k) expert ids,
    best first, computed from the router logits the layer itself routed with (moe.route)."""
    layers = moe.pesc_layers(model)
    chosen = [None] * len(layers)
    k = model.config.moe.top_k
    for i, ff in enumerate(layers):
        def hook(router, inputs, logits, i=i):
            chosen[i] = moe.route(logits, k)[1]
        ff.router.register_forward_hook(hook)
    return chosen


def print_experts(tokenizer, ids, experts, out=None):
    """One line per generated token: its text, then per layer the experts that produced it."""
    out = out or sys.stdout
    out.write("experts per generated token (the forward that produced it; per layer, best first):\n")
    for id, per_layer in zip(ids, experts):
        layers = "  ".join(f"L{i}:" + ",".join(str(e) for e in ex) for i, ex in enumerate(per_layer))
        out.write(f"{id:>7} {tokenizer.decode([id])!r:<14} {layers}\n")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def read_prompt(spec):
    """--prompt: text, FILE:path (read as is), or - (all of stdin); None when not given."""
    if spec == "-":
        return sys.stdin.read()
    if spec is not None and spec.startswith("FILE:"):
        path = spec[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"--prompt {spec}: cannot read {path}: {e}") from None
    return spec


# -----------------------------------------------------------------------------
# The command line


def reply(model, tokenizer, ids, args, sampling, experts_seen):
    """Stream --num_samples samples continuing ids; return the first one's text (no stop token)."""
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise SystemExit(f"the prompt has {len(ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}")
    max_new = min(args.max_new_tokens, room)
    if max_new < args.max_new_tokens:
        log(f"(max_new_tokens cut to {max_new}: the model's max_seq_len is {model.config.max_seq_len})")
    stop = set(tokenizer.stop_ids)
    first = None
    for s in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {s + 1}/{args.num_samples}", flush=True)
        stream, new, experts, token_times = TextStream(tokenizer), [], [], []

        def on_token(next_ids):
            id = int(next_ids[0])
            token_times.append(time.perf_counter())
            new.append(id)
            if id not in stop:
                stream.put(id)
            if experts_seen is not None:  # B = 1: the last row holds the token's own position
                experts.append([layer[-1].tolist() for layer in experts_seen])

        t0 = time.perf_counter()
        generate(model, [ids], max_new, args.temperature, args.top_k or None, args.top_p, tokenizer.stop_ids,
                 vocab_size=tokenizer.vocab_size, on_token=on_token, **sampling)
        dt = time.perf_counter() - t0
        stream.end()
        print(flush=True)
        if experts_seen is not None:
            print_experts(tokenizer, new, experts)
        ttft = token_times[0] - t0
        note = " (includes compiling)" if args.compile and s == 0 else ""
        log(f"[{len(new)} tokens in {dt:.2f} s: {len(new) / dt:.1f} tokens/s{note}; prompt {len(ids)} tokens, "
            f"first token after {ttft:.2f} s]")
        if first is None:
            first = tokenizer.decode([i for i in new if i not in stop])
    return first


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a project checkpoint (dense or PESC).", allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint directory: config.json, safetensors, tokenizer")
    p.add_argument("--prompt", default=None,
                   help="text, FILE:path, or - to read stdin (default: none, i.e. BOS alone; with --chat in a "
                        "terminal, ask)")
    p.add_argument("--chat", default=False, **cli.FLAG, help="wrap the prompt in the chat template; converse in a terminal")
    p.add_argument("--template", default=None, choices=TEMPLATES, help="chat template (default: the checkpoint's)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling, e.g. 0.95 (default off)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    cli.add_device_dtype(p)
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="nf4: hold the base linears in 4-bit NF4 (quant.py), quantized while loading")
    p.add_argument("--compile", default=False, **cli.FLAG, help="compile the one-token decode step (CUDA graphs on GPU) over a static KV cache")
    p.add_argument("--show_experts", default=False, **cli.FLAG, help="PESC: print the experts each generated token used")
    args = p.parse_args(argv)
    if args.system is not None and not args.chat:
        p.error("--system needs --chat")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be >= 1")

    device = cli.resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton kernels launch on the current device
    dtype = cli.resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model = Transformer.from_pretrained(args.ckpt, device=device, dtype=dtype, quantize=args.quantize).eval()
    tokenizer = Tokenizer(args.ckpt, template=args.template)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"{args.ckpt}: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding "
                         f"only {model.config.vocab_size}")
    c = model.config
    kind = (f"PESC {c.moe.num_experts} experts top-{c.moe.top_k}" if c.moe is not None else "dense")
    if args.quantize:
        kind += f", base linears in {args.quantize}"
    log(f"loaded {args.ckpt}: {model.num_params():,} parameters, {kind}, {str(dtype)[6:]} on {device}, "
        f"{tokenizer.kind} tokenizer, in {time.perf_counter() - t0:.1f} s")

    experts_seen = None
    if args.show_experts:
        if c.moe is None:
            raise SystemExit(f"--show_experts: {args.ckpt} is a dense model, it has no experts")
        experts_seen = record_experts(model)
    sampling = dict(generator=torch.Generator(device).manual_seed(args.seed),
                    decode_fn=compile_decode_step(device) if args.compile else decode_step,
                    static_cache=args.compile)
    prompt = read_prompt(args.prompt)

    if not args.chat:
        ids = tokenizer.encode(prompt or "", bos=True)
        if not ids:
            raise SystemExit(f"empty prompt and the {tokenizer.kind} tokenizer has no BOS token: give --prompt")
        reply(model, tokenizer, ids, args, sampling, experts_seen)
        return

    # Chat: the whole conversation is re-encoded with the template and prefilled again each
    # turn (no KV cache carried between turns): simple, and the model always sees the
    # template's own tokenization of its earlier answers.
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    if prompt is None and not interactive:
        raise SystemExit("--chat: give --prompt (or run in a terminal to converse)")
    while True:
        if prompt is None:
            try:
                prompt = input("> ")
            except EOFError:
                print()
                return
            if not prompt.strip():
                prompt = None
                continue
        messages.append({"role": "user", "content": prompt})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        answer = reply(model, tokenizer, ids, args, sampling, experts_seen)
        messages.append({"role": "assistant", "content": answer})
        prompt = None
        if not interactive:
            return


if __name__ == "__main__":
    main()
