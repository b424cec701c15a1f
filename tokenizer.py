"""
Tokenizers for the model families PESC upcycles, and the chat templates that wrap them.

Three kinds of tokenizer file, told apart by their content, never by their name:
- "tiktoken": Llama 3's tokenizer.model, text lines of `<base64 token> <rank>`; 256 special
  tokens follow the ranks (128000.. for Llama 3, 256.. for the byte-level demo file).
- "sentencepiece": the binary protobuf tokenizer.model of Llama 2, Mistral and Yi.
- "bpe": byte-level BPE from vocab.json + merges.txt (Qwen, so Qwen2idae), run by tiktoken with
  the token ids as BPE ranks.
Text a user gives is never parsed for special tokens: "<|eot_id|>" typed in a prompt stays text.
Chat templates ("camelidae", "llama2", "llama3", "chatml") are the table CHAT_TEMPLATES of one
small function each: a conversation -> parts (special-token ids and text, each marked target or
not); Tokenizer.encode_chat encodes the parts into ids and a target mask that is True exactly on
the tokens a model must learn to produce. JINJA_TEMPLATES are the same templates as Jinja, and
write_hf_tokenizer writes a tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json
with the Jinja template, generation_config.json) that encode exactly as this module does, for an
HF export that transformers and vLLM read.
"""

import base64
import json
import os
import re
import unicodedata


# Llama 3's pre-tokenizer split, and Qwen2's: the same but one digit at a time.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

DEFAULT_TEMPLATE = {"tiktoken": "llama3", "bpe": "chatml", "sentencepiece": "llama2"}
# Tokens that end a generation whenever a tokenizer has them (the eos id always does).
STOP_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# tiktoken's regex engine overflows its stack on very long runs of whitespace (or of
# non-whitespace), e.g. a million spaces; such runs are cut into slices of this many characters
# and encoded slice by slice, as Meta's own Llama 3 tokenizer does.
MAX_RUN_CHARS = 25_000
LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS, MAX_RUN_CHARS))


def llama3_specials(first_id):
    """Names -> ids of Llama 3's 256 special tokens, which start right after the BPE ranks.

    Returns (canonical, aliases). The canonical names are Llama 3.0's, except the three slots
    Llama 3.1 gave a meaning to, which carry their 3.1 names; their 3.0 names are the aliases.
    """
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    assert len(names) == 256
    aliases = {}
    for offset, name in ((4, "<|finetune_right_pad_id|>"), (8, "<|eom_id|>"), (10, "<|python_tag|>")):
        aliases[names[offset]] = first_id + offset
        names[offset] = name
    return {name: first_id + i for i, name in enumerate(names)}, aliases


TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json",
                   "special_tokens_map.json")


def tokenizer_files(src):
    """(source path, name) of the tokenizer files in directory src, to copy beside a checkpoint;
    Llama 3's original/tokenizer.model (where HF repos keep Meta's file) counts as tokenizer.model."""
    files = [(os.path.join(src, n), n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    nested = os.path.join(src, "original", "tokenizer.model")
    if not os.path.isfile(os.path.join(src, "tokenizer.model")) and os.path.isfile(nested):
        files.append((nested, "tokenizer.model"))
    return files


def write_tokenizer_config(out_dir, src_dir=None, chat_template=None, keep_src_template=False):
    """Write out_dir/tokenizer_config.json, the file that names a checkpoint's chat template.

    It starts from src_dir's tokenizer_config.json when there is one (its added tokens and other
    keys stay). chat_template: a name from TEMPLATES, which replaces src's unless
    keep_src_template and src has one; None removes the key (an HF export: HF wants Jinja there).
    Returns the file's path, or None when there is nothing to write. Written in place: callers
    write checkpoints into a temporary directory that is renamed once complete (files.py)."""
    config = {}
    src_file = os.path.join(src_dir, "tokenizer_config.json") if src_dir else None
    if src_file and os.path.isfile(src_file):
        config = read_json(src_file)
        if not isinstance(config, dict):
            raise ValueError(f"{src_file}: expected a JSON object")
    if chat_template is None:
        config.pop("chat_template", None)
    elif not (keep_src_template and "chat_template" in config):
        config["chat_template"] = chat_template
    if not config:
        return None
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def write_byte_tokenizer(path):
    """Write a tiktoken file whose 256 ranks are the single bytes (vocab 256 + 256 specials = 512)."""
    with open(path, "w") as f:
        for b in range(256):
            f.write(f"{base64.b64encode(bytes([b])).decode()} {b}\n")
    return path


def byte_to_unicode():
    """GPT-2's table that gives each byte a printable character, as vocab.json spells tokens."""
    # Printable latin-1 bytes stand for themselves; the other 68 bytes are moved to 256, 257, ...
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def added_tokens(config, config_path):
    """{name: id} from an HF tokenizer_config.json's added_tokens_decoder (and added_tokens.json)."""
    tokens = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and key.isdigit()):
            raise ValueError(f"{config_path}: added_tokens_decoder[{key!r}] should be {{\"content\": str}} under an integer id")
        tokens[entry["content"]] = int(key)
    extra = os.path.join(os.path.dirname(config_path), "added_tokens.json")
    if os.path.isfile(extra):
        for name, id in read_json(extra).items():
            if not isinstance(id, int):
                raise ValueError(f"{extra}: id of {name!r} should be an integer, got {id!r}")
            tokens[name] = id
    return tokens


def template_from_config(value, config_path):
    """The template a tokenizer_config.json's chat_template names: one of TEMPLATES, or the
    Jinja template an HF checkpoint stores there, recognised by the markers it writes."""
    if isinstance(value, list):  # HF's list form: [{"name": "default", "template": "..."}, ...]
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if value in TEMPLATES:
        return value
    if isinstance(value, str):
        for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                             ("### Human", "camelidae"), ("[INST]", "llama2")):
            if marker in value:
                return name
    raise ValueError(f"{config_path}: chat_template is none of {TEMPLATES} and not a Jinja template using "
                     f"their markers; pass Tokenizer(..., template=NAME)")


# -----------------------------------------------------------------------------
# Chat templates: messages -> [(special id or text, is_target), ...]; a None id (a tokenizer
# without BOS) is dropped. Text between two specials is encoded as one string.


def user_assistant_pairs(template, messages, add_generation_prompt):
    """(system or None, [(user, answer or None), ...]) for templates whose turns must alternate,
    user first; for them a user turn always ends in the open assistant header."""
    has_system = messages[0]["role"] == "system"
    turns = messages[1:] if has_system else messages
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"{template}: message {i + has_system} should be from the "
                             f"{'user' if i % 2 == 0 else 'assistant'}; the turns must alternate, user first")
    if not turns:
        raise ValueError(f"{template}: needs a user message")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ValueError(f"{template}: add_generation_prompt needs the last message to be the user's")
    pairs = [(turns[i]["content"], turns[i + 1]["content"] if i + 1 < len(turns) else None)
             for i in range(0, len(turns), 2)]
    return (messages[0]["content"] if has_system else None), pairs


def camelidae_chat(tok, messages, add_generation_prompt):
    """<s> once, optional "### System:", then every turn continues the same text."""
    system, pairs = user_assistant_pairs("camelidae", messages, add_generation_prompt)
    parts = [(tok.bos_id, False)] + ([(f"### System:\n{system}\n", False)] if system is not None else [])
    for user, answer in pairs:
        parts.append((f"### Human:\n{user}\n### Assistant:\n", False))
        if answer is not None:
            parts += [(answer, True), (tok.eos_id, True)]
    return parts


def llama2_chat(tok, messages, add_generation_prompt):
    """Meta's Llama 2 chat: the system block inside the first [INST], contents stripped, each
    finished turn <s>[INST] u [/INST] a </s> as one string (" a " alone would get a second "▁")."""
    system, pairs = user_assistant_pairs("llama2", messages, add_generation_prompt)
    parts = []
    for i, (user, answer) in enumerate(pairs):
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        parts += [(tok.bos_id, False), (f"[INST] {user.strip()} [/INST]", False)]
        if answer is not None:
            parts += [(f" {answer.strip()} ", True), (tok.eos_id, True)]
    return parts


def llama3_chat(tok, messages, add_generation_prompt):
    """<|begin_of_text|>, then a header and the stripped content (as Meta does) per message."""
    start, end, eot = (tok.special_id(n) for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    parts = [(tok.bos_id, False)]
    for m in messages:
        target = m["role"] == "assistant"
        parts += [(start, False), (m["role"], False), (end, False), ("\n\n", False),
                  (m["content"].strip(), target), (eot, target)]
    if add_generation_prompt:
        parts += [(start, False), ("assistant", False), (end, False), ("\n\n", False)]
    return parts


def chatml_chat(tok, messages, add_generation_prompt):
    """<|im_start|>role\ncontent<|im_end|>\n per message; a tokenizer with a BOS (sparsetral's
    Mistral one) starts with it, as its base model always saw; Qwen has none."""
    im_start, im_end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    parts = [(tok.bos_id, False)]
    for m in messages:
        target = m["role"] == "assistant"
        parts += [(im_start, False), (m["role"] + "\n", False), (m["content"], target),
                  (im_end, target), ("\n", False)]
    if add_generation_prompt:
        parts += [(im_start, False), ("assistant\n", False)]
    return parts


CHAT_TEMPLATES = {"camelidae": camelidae_chat, "llama2": llama2_chat, "llama3": llama3_chat, "chatml": chatml_chat}
TEMPLATES = tuple(CHAT_TEMPLATES)  # the names, e.g. for a command line's choices

# The same templates as Jinja, for tokenizer_config.json (transformers' apply_chat_template, vLLM's
# chat server): rendered and tokenized with the special tokens parsed, each renders exactly the ids
# its function above gives (tests/test_export_hf.py). Special-token names typed in a message become
# special tokens there, as with any Jinja chat template; encode_chat keeps them text.
_JINJA_CHECKS = (  # encode_chat's checks on the messages, and system/turns for the pair templates
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] or (m['role'] == 'system' and not loop.first) -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': role must be user or assistant (system only first)') -}}"
    "{%- endif -%}{%- endfor -%}")
_JINJA_PAIRS = (  # user_assistant_pairs: the turns alternate, user first
    _JINJA_CHECKS +
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if not turns -%}{{- raise_exception('needs a user message') -}}{%- endif -%}"
    "{%- for m in turns -%}{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "{{- raise_exception('the turns must alternate, user first') -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and turns[-1]['role'] != 'user' -%}"
    "{{- raise_exception('add_generation_prompt needs the last message to be the user\\'s') -}}{%- endif -%}")
JINJA_TEMPLATES = {
    "camelidae": _JINJA_PAIRS +
        "{{- bos_token or '' -}}"
        "{%- if system is not none -%}{{- '### System:\\n' + system + '\\n' -}}{%- endif -%}"
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{- '### Human:\\n' + m['content'] + '\\n### Assistant:\\n' -}}"
        "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}",
    "llama2": _JINJA_PAIRS +
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set user = m['content'] -%}"
        "{%- if loop.first and system is not none -%}{%- set user = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + user -%}{%- endif -%}"
        "{{- (bos_token or '') + '[INST] ' + user | trim + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + m['content'] | trim + ' ' + eos_token -}}{%- endif -%}{%- endfor -%}",
    "llama3": _JINJA_CHECKS +
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
    "chatml": _JINJA_CHECKS +
        "{{- bos_token or '' -}}"
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
}
assert set(JINJA_TEMPLATES) == set(CHAT_TEMPLATES)


def common_prefix(a, b):
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


class Tokenizer:
    """A tokenizer file or a checkpoint directory holding one; see the module docstring."""

    def __init__(self, path, template=None):
        self.path = path
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
        config, config_path, file = {}, None, path
        if os.path.isdir(path):
            config_path = os.path.join(path, "tokenizer_config.json")
            config = read_json(config_path) if os.path.isfile(config_path) else {}
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object")
            # Meta's Llama 3 repos on the HF hub keep the tiktoken file under original/.
            candidates = [os.path.join(path, "tokenizer.model"), os.path.join(path, "original", "tokenizer.model")]
            file = next((c for c in candidates if os.path.isfile(c)), None)
            if file is None:
                vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
                if not (os.path.isfile(vocab) and os.path.isfile(merges)):
                    raise FileNotFoundError(f"{path}: holds neither tokenizer.model nor vocab.json + merges.txt")
                self._load_bpe(vocab, merges, added_tokens(config, config_path))
        if file is not None:
            with open(file, "rb") as f:
                data = f.read()
            if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", data.split(b"\n", 1)[0].strip()):
                self._load_tiktoken(file, data)
            else:
                added = added_tokens(config, config_path) if config_path else {}
                self._load_sentencepiece(file, data, added)

        # id -> name for decode; the canonical names come first so that aliases do not win
        self._special_names = {}
        for name, id in self._specials.items():
            self._special_names.setdefault(id, name)
        self.stop_ids = sorted({self.eos_id} | {self._specials[n] for n in STOP_NAMES if n in self._specials})
        if template is None and "chat_template" in config:
            template = template_from_config(config["chat_template"], config_path)
        self.template = template or DEFAULT_TEMPLATE[self.kind]
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown chat template {self.template!r}; expected one of {TEMPLATES}")

    # ----------------------------------------------------------------------------------------
    # loading

    def _load_tiktoken(self, file, data):
        # Parsed by hand rather than with tiktoken.load.load_tiktoken_bpe to name the bad line.
        ranks = {}
        for line_no, line in enumerate(data.decode("ascii", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # also binascii.Error
                raise ValueError(f"{file}:{line_no}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"{file}: the ranks of its {n} tokens are not exactly 0..{n - 1}")
        canonical, aliases = llama3_specials(first_id=n)
        self.kind = "tiktoken"
        import tiktoken  # here, not at the top: a GPU box with only torch can import the rest

        self._tt = tiktoken.Encoding(os.path.basename(file), pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=canonical)
        self._ranks, self._pattern = ranks, LLAMA3_PATTERN
        self._specials = {**canonical, **aliases}
        self.vocab_size = n + len(canonical)
        self.bos_id = canonical["<|begin_of_text|>"]
        self.eos_id = canonical["<|end_of_text|>"]
        self.pad_id = canonical["<|finetune_right_pad_id|>"]

    def _load_sentencepiece(self, file, data, added):
        try:
            # An empty file parses as an empty protobuf, so check that pieces were read.
            import sentencepiece  # here, not at the top (see _load_tiktoken)

            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data) if data.strip() else None
            self._sp_file = file
        except RuntimeError:
            self._sp = None
        if self._sp is None or self._sp.get_piece_size() == 0:
            raise ValueError(f"{file}: neither a tiktoken BPE file (lines of '<base64> <rank>') nor a SentencePiece "
                             f"model (for byte-level BPE pass the directory holding vocab.json and merges.txt)")
        sp = self._sp
        self.kind = "sentencepiece"
        # sp.encode never produces control pieces (<s>, </s>, Mistral's [INST]...), so they are the
        # specials; tokens an HF checkpoint added past the model's pieces (sparsetral's
        # <|im_start|>) join them.
        self._specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        self._specials.update({name: id for name, id in added.items() if id >= sp.get_piece_size()})
        self.vocab_size = max([sp.get_piece_size(), *[id + 1 for id in self._specials.values()]])
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        if self.eos_id is None:
            raise ValueError(f"{file}: SentencePiece model defines no eos piece")

    def _load_bpe(self, vocab_file, merges_file, added):
        vocab = read_json(vocab_file)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object of token -> id")
        for token, id in vocab.items():
            if not isinstance(id, int) or id < 0:
                raise ValueError(f"{vocab_file}: id of {token!r} should be a non-negative integer, got {id!r}")
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        # Specials: added tokens, else Qwen's three, taken from vocab.json when it lists them and
        # otherwise appended after the last id (which gives Qwen's own 151643, 151644, 151645).
        specials = dict(added)
        for name in QWEN_SPECIALS:
            if name not in specials:
                specials[name] = vocab[name] if name in vocab else max([*vocab.values(), *specials.values()]) + 1
        ranks = {}
        for token, id in vocab.items():
            if token in specials:
                continue
            if any(c not in to_byte for c in token):
                raise ValueError(f"{vocab_file}: token {token!r} is not spelled in the byte-level alphabet")
            ranks[bytes(to_byte[c] for c in token)] = id
        if len(set(ranks.values())) != len(ranks):
            raise ValueError(f"{vocab_file}: two tokens share an id")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{vocab_file}: byte-level vocab lacks the single byte 0x{missing[0]:02x}")
        clash = set(specials.values()) & set(ranks.values())
        if clash:
            raise ValueError(f"{vocab_file}: special token id {min(clash)} is also an ordinary token's id")
        # tiktoken merges the adjacent pair whose result has the lowest rank, HF the pair listed
        # first in merges.txt; with ids as ranks the two agree only if the merges come in id order.
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        last_id = -1
        for line_no, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2 or "".join(pair) not in vocab:
                raise ValueError(f"{merges_file}:{line_no}: expected two tokens whose join is in vocab.json, got {line!r}")
            id = vocab["".join(pair)]
            if id <= last_id:
                raise ValueError(f"{merges_file}:{line_no}: merge {line!r} makes id {id} after id {last_id}; "
                                 f"merges out of id order cannot run with ids as BPE ranks")
            last_id = id
        self.kind = "bpe"
        import tiktoken  # here, not at the top (see _load_tiktoken)

        self._tt = tiktoken.Encoding(os.path.basename(os.path.dirname(os.path.abspath(vocab_file))),
                                     pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        self._ranks, self._pattern = ranks, QWEN2_PATTERN
        self._specials = specials
        self.vocab_size = max([*ranks.values(), *specials.values()]) + 1
        self.bos_id = None  # Qwen has no BOS
        self.eos_id = specials["<|endoftext|>"]
        self.pad_id = specials["<|endoftext|>"]  # as Qwen pads; padding is masked out anyway

    # ----------------------------------------------------------------------------------------
    # text <-> ids

    def encode(self, text, bos=False, eos=False):
        """Token ids of text; special-token names in the text stay plain text. bos is a no-op
        for tokenizers without one (Qwen)."""
        if self.kind == "sentencepiece":
            ids = self._sp.encode(text)
        else:
            if self.kind == "bpe":
                text = unicodedata.normalize("NFC", text)  # Qwen's tokenizer normalises to NFC first
            ids, start = [], 0
            for run in LONG_RUN.finditer(text):
                for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                    ids += self._tt.encode_ordinary(text[start:cut])
                    start = cut
            ids += self._tt.encode_ordinary(text[start:])
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        """Text of ids, special tokens written as their names. A cut-off UTF-8 sequence (a
        streamed prefix) decodes to U+FFFD instead of raising."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: id {bad[0]} is outside the vocabulary (size {self.vocab_size}) of {self.path}")
        if self.kind != "sentencepiece":
            try:
                return self._tt.decode_bytes(ids).decode("utf-8", errors="replace")
            except KeyError as e:  # an id in a gap of a BPE vocab
                raise ValueError(f"decode: {e.args[0]} (no such token in {self.path})") from None
        # sp.decode drops control pieces, so cut the ids at the specials and name those ourselves
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self._special_names:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if i is not None:
                    out.append(self._special_names[i])
            else:
                run.append(i)
        return "".join(out)

    def special_id(self, name):
        """Id of a special token by name, e.g. special_id("<|eot_id|>") -> 128009."""
        if name not in self._specials:
            raise KeyError(f"{name!r} is not a special token of {self.path} ({self.kind})")
        return self._specials[name]

    # ----------------------------------------------------------------------------------------
    # chat templates

    def encode_plain(self, text):
        """(ids, mask) for plain training text (Camelidae `corpus` records): bos + text + eos,
        every token after bos a target."""
        ids = self.encode(text, bos=True, eos=True)
        return ids, [i > 0 or self.bos_id is None for i in range(len(ids))]

    def encode_chat(self, messages, template=None, add_generation_prompt=False):
        """(ids, target_mask) of a conversation, messages = [{"role", "content"}, ...].

        target_mask[i] is True on assistant content and the token that ends its turn (</s>,
        <|eot_id|>, <|im_end|>); ChatML's "\\n" after <|im_end|> is not a target (the model
        has stopped by then). add_generation_prompt=True ends the ids with the open assistant
        header. For camelidae and llama2 a user turn always ends in that header
        ("### Assistant:\\n", "[/INST]"), so there the flag only checks that the last message
        is the user's.
        """
        template = template or self.template
        if template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
        if not messages:
            raise ValueError("encode_chat: no messages")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i}: expected {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
            if m["role"] == "system" and i > 0:
                raise ValueError(f"message {i}: a system message may only come first")
        parts = CHAT_TEMPLATES[template](self, messages, add_generation_prompt)
        return self._encode_parts([p for p in parts if p[0] is not None])

    def _encode_parts(self, parts):
        """ids and mask of [(special id | text, is_target), ...]. Consecutive texts are encoded
        as one string, so the ids are those of the whole text; a text part's tokens are found
        by encoding the text up to its end and keeping what agrees with the whole (a token
        that straddles two parts goes to the later one)."""
        ids, mask, run = [], [], []
        for piece, target in parts + [(None, False)]:
            if isinstance(piece, str):
                run.append((piece, target))
                continue
            if run:
                whole = self.encode("".join(text for text, _ in run))
                text, start = "", 0
                for k, (part, part_target) in enumerate(run):
                    text += part
                    end = len(whole) if k == len(run) - 1 else common_prefix(self.encode(text), whole)
                    mask += [part_target] * max(end - start, 0)
                    start = max(start, end)
                ids += whole
                run = []
            if piece is not None:
                ids.append(piece)
                mask.append(target)
        assert len(ids) == len(mask)
        return ids, mask


# -----------------------------------------------------------------------------
# Hugging Face tokenizer files, for a checkpoint exported to the HF layout (convert.py --to hf):
# tokenizer.json (the `tokenizers` library's format), tokenizer_config.json with the Jinja chat
# template, and generation_config.json with the stop ids. Written from this module's own
# tokenizers, without transformers, so that AutoTokenizer (and vLLM through it) encodes exactly
# as Tokenizer does.

_ADDED = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def byte_level_merges(ranks):
    """BPE merges in the order a rank-based BPE (tiktoken) applies them: every split of a token
    into two tokens, ordered by the merged token's rank. ranks: {bytes: rank}."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def sentencepiece_settings(tok):
    """(model proto, why not) of a SentencePiece tokenizer: why it has no tokenizer.json that
    encodes as it does, or None. tokenizer.json's BPE merges by rank and replaces spaces
    plainly; a SentencePiece model that normalises text (NFKC, collapsed whitespace) or is not
    BPE (Unigram) has no such equivalent here."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok._sp.serialized_model_proto())
    n, t = proto.normalizer_spec, proto.trainer_spec
    if t.model_type != t.BPE:
        return proto, f"its model type is {t.ModelType.Name(t.model_type)}, not BPE"
    if n.name not in ("identity", "") or n.precompiled_charsmap:
        return proto, f"it normalises text with the {n.name!r} rule"
    if n.remove_extra_whitespaces:
        return proto, "it removes extra whitespace (remove_extra_whitespaces)"
    if not n.escape_whitespaces:
        return proto, "it keeps spaces unescaped (escape_whitespaces off)"
    if any(p.type == p.USER_DEFINED for p in proto.pieces):
        return proto, "it has user-defined pieces"
    return proto, None


def hf_tokenizer_json(tok) -> dict:
    """tok as a tokenizer.json that encodes every text as tok.encode does; ValueError (naming the
    file and why) for a SentencePiece model that no tokenizer.json matches."""
    specials = sorted((id, name) for id, name in tok._special_names.items())
    # The specials are in the model's vocab too: `tokenizers` numbers an added token that is not
    # from the end of the vocab on, which moves any that come after a gap in the ids.
    added = [dict(id=id, content=name, **_ADDED) for id, name in specials]
    bos = tok._special_names.get(tok.bos_id) if tok.bos_id is not None else None
    post = None if bos is None else {  # encode(text, bos=True): what a plain prompt gets
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    if tok.kind == "sentencepiece":
        proto, why = sentencepiece_settings(tok)
        if why is not None:
            raise ValueError(f"{tok._sp_file}: this SentencePiece model has no Hugging Face tokenizer.json that "
                             f"encodes as it does: {why}")
        pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
        pieces.update({name: id for id, name in specials if name not in pieces})  # see `added`
        scores = {p.piece: p.score for p in proto.pieces if p.type == p.NORMAL}
        merges = sorted((-scores[p], pieces[p[:i]], pieces[p[i:]], p[:i], p[i:]) for p in scores
                        for i in range(1, len(p)) if p[:i] in scores and p[i:] in scores)
        prepend = proto.normalizer_spec.add_dummy_prefix  # sp.encode starts every text with a space
        normalizer = [{"type": "Prepend", "prepend": "\u2581"}] if prepend else []
        normalizer.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
        decoder = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                   {"type": "ByteFallback"}, {"type": "Fuse"}]
        if prepend:
            decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        model = {"type": "BPE", "dropout": None, "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": proto.trainer_spec.byte_fallback, "ignore_merges": False,
                 "vocab": pieces, "merges": [[a, b] for *_, a, b in merges]}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizer}, "pre_tokenizer": None,
                "post_processor": post, "decoder": {"type": "Sequence", "decoders": decoder}, "model": model}
    # byte-level BPE (tiktoken and vocab.json + merges.txt): tokens spelled in GPT-2's byte alphabet
    table = byte_to_unicode()
    spell = lambda b: "".join(table[x] for x in b)  # noqa: E731
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": True,  # as tiktoken: a piece that is a token is not split
             "vocab": {**{spell(b): r for b, r in tok._ranks.items()}, **{name: id for id, name in specials}},
             "merges": [[spell(a), spell(b)] for a, b in byte_level_merges(tok._ranks)]}
    split = {"type": "Split", "pattern": {"Regex": tok._pattern}, "behavior": "Isolated", "invert": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if tok.kind == "bpe" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                split, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}


def write_hf_tokenizer(tok, out_dir, template=None):
    """Write tok's tokenizer.json, tokenizer_config.json (the Jinja chat template of `template`,
    default tok.template) and generation_config.json (tok.stop_ids end a generation) into
    out_dir; returns [(path, name), ...]. ValueError for a tokenizer no tokenizer.json matches."""
    template = template or tok.template
    names = tok._special_names
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json alone says how to encode
        "bos_token": names.get(tok.bos_id), "eos_token": names.get(tok.eos_id),
        "pad_token": names.get(tok.pad_id), "unk_token": None,
        "added_tokens_decoder": {str(id): dict(content=name, **_ADDED) for id, name in sorted(names.items())},
        "chat_template": JINJA_TEMPLATES[template],
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was
        "model_max_length": 1 << 30,
    }
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id}
    files = [("tokenizer.json", hf_tokenizer_json(tok)), ("tokenizer_config.json", config),
             ("generation_config.json", generation)]
    out = []
    for name, content in files:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
        out.append((path, name))
    return out
