# Tests for tokenizer.py on real tokenizer files: Llama 3's tiktoken file from the llama-models
# wheel and Mistral's SentencePiece model from mistral-common (CI installs both with
# `pip install --no-deps llama-models mistral-common`; a missing package fails, never skips),
# plus a byte-level tiktoken file and a tiny byte-level BPE written here.
import importlib.util
import json
import os
import shutil

import pytest

from tokenizer import Tokenizer, byte_to_unicode, write_byte_tokenizer, write_tokenizer_config

MIXED = [
    "Hello, world! It's a test.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs",
    "中文分词测试，混合 English 和 数字 12345。",
    "emoji 🦙🔥 and a joined one 👩\u200d💻",
    "   leading and trailing   ",
    "many     spaces\n\n\n\nnewlines\r\nCRLF",
    "",
]


def package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is not installed; run: pip install --no-deps llama-models mistral-common"
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    assert os.path.isfile(path), f"{path} is missing from the installed {package}"
    return path


@pytest.fixture(scope="module")
def llama3_path():
    return package_file("llama_models", "llama3", "tokenizer.model")


@pytest.fixture(scope="module")
def mistral_path():
    return package_file("mistral_common", "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def llama3(llama3_path):
    return Tokenizer(llama3_path)


@pytest.fixture(scope="module")
def mistral(mistral_path):
    return Tokenizer(mistral_path)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    return Tokenizer(write_byte_tokenizer(str(tmp_path_factory.mktemp("byte") / "tokenizer.model")))


# A tiny byte-level BPE: the 256 bytes keep their values as ids, each merge adds the next id.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("Ġa", "n"), ("Ġan", "d"),
          ("ä", "¸"), ("ä¸", "Ń"), ("1", "2"), ("Ċ", "Ċ")]


def tiny_bpe_vocab():
    table = byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def write_tiny_bpe(folder, config=None, merges=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tiny_bpe_vocab(), f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in (merges or MERGES)))
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(folder)


QWEN_ADDED = {"added_tokens_decoder": {"300": {"content": "<|endoftext|>"}, "301": {"content": "<|im_start|>"},
                                       "302": {"content": "<|im_end|>"}}}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return Tokenizer(write_tiny_bpe(tmp_path_factory.mktemp("bpe"), config=QWEN_ADDED))


# ------------------------------------------------------------------------------------------------
# Llama 3 (tiktoken)

def test_llama3_known_ids(llama3):
    assert llama3.kind == "tiktoken"
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert llama3.special_id("<|begin_of_text|>") == 128000
    assert llama3.special_id("<|start_header_id|>") == 128006
    assert llama3.special_id("<|end_header_id|>") == 128007
    assert llama3.special_id("<|eot_id|>") == 128009
    # Llama 3.0 and 3.1 names for the slots 3.1 renamed both work
    assert llama3.special_id("<|eom_id|>") == llama3.special_id("<|reserved_special_token_4|>") == 128008
    assert llama3.special_id("<|python_tag|>") == llama3.special_id("<|reserved_special_token_5|>") == 128010
    assert llama3.special_id("<|reserved_special_token_250|>") == 128255
    assert set(llama3.stop_ids) == {128001, 128008, 128009}
    assert llama3.template == "llama3"
    # ids as Meta's reference tokenizer gives them (Hello, ',', ' world', '!'; "\n\n")
    assert llama3.encode("Hello, world!", bos=True, eos=True) == [128000, 9906, 11, 1917, 0, 128001]
    assert llama3.encode("\n\n") == [271]
    assert llama3.decode([128000, 9906, 128009]) == "<|begin_of_text|>Hello<|eot_id|>"
    with pytest.raises(KeyError, match="<|im_start|>"):
        llama3.special_id("<|im_start|>")


def test_llama3_matches_meta_reference(llama3, llama3_path):
    # Meta's own tiktoken wrapper from the same wheel is an independent implementation.
    from pathlib import Path
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    meta = MetaTokenizer(Path(llama3_path))
    for text in MIXED + ["<|eot_id|> is text here", " 1234567 digits in threes"]:
        assert llama3.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True), text
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"):
        assert llama3.special_id(name) == meta.special_tokens[name], name


def test_round_trips(llama3, mistral, byte_tok, bpe):
    for tok in (llama3, mistral, byte_tok, bpe):
        for text in MIXED:
            assert tok.decode(tok.encode(text)) == text, (tok.kind, text)


def test_special_strings_in_user_text_stay_text(llama3, mistral, byte_tok, bpe):
    for tok, text in ((llama3, "a <|eot_id|> b <|begin_of_text|>"), (mistral, "a </s> b <s>"),
                      (byte_tok, "<|end_of_text|>"), (bpe, "<|im_end|><|endoftext|>")):
        ids = tok.encode(text)
        specials = set(tok._special_names)
        assert not specials & set(ids), tok.kind
        assert tok.decode(ids) == text
    # ... also inside a chat: one <|eot_id|> per message, however the user writes it
    ids, _ = llama3.encode_chat([{"role": "user", "content": "stop <|eot_id|> here"}])
    assert ids.count(128009) == 1


def test_decode_partial_utf8(llama3, mistral):
    # "🦙" is several byte-level tokens in Llama 3 and byte-fallback pieces in Mistral, so a
    # prefix of its ids ends inside the UTF-8 sequence, as in streaming.
    for tok in (llama3, mistral):
        ids = tok.encode("x🦙")
        assert len(ids) >= 3, ids
        for k in range(len(ids) + 1):
            tok.decode(ids[:k])  # must not raise
        assert "\ufffd" in tok.decode(ids[:-1])
        assert tok.decode(ids) == "x🦙"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama3.decode([128256])


def test_long_whitespace_run(byte_tok):
    # tiktoken's regex overflows its stack on a million spaces in one call; encode cuts the run
    text = "a" + " " * 1_000_000 + "b"
    ids = byte_tok.encode(text)
    assert ids == list(text.encode())
    assert byte_tok.decode(ids) == text


# ------------------------------------------------------------------------------------------------
# Mistral (SentencePiece)

def test_mistral_known_ids(mistral):
    assert mistral.kind == "sentencepiece"
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id, mistral.pad_id) == (32000, 1, 2, None)
    assert mistral.stop_ids == [2]
    assert mistral.special_id("<s>") == 1 and mistral.special_id("</s>") == 2
    assert mistral.template == "llama2"
    assert mistral.encode("Hello", bos=True, eos=True) == [1, 22557, 2]  # '▁Hello'
    # decode names the specials (sp.decode alone would drop them) and keeps text exact
    assert mistral.decode([1, 22557, 2, 1, 22557]) == "<s>Hello</s><s>Hello"


# ------------------------------------------------------------------------------------------------
# chat templates; expected sequences are built from encode() pieces plus explicit special ids

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4."}
U2 = {"role": "user", "content": "和 3+3？"}
A2 = {"role": "assistant", "content": "6 🙂"}


def test_llama3_template(llama3):
    e = llama3.encode
    start, end, eot = 128006, 128007, 128009

    def header(role):
        return [start] + e(role) + [end] + e("\n\n")

    ids, mask = llama3.encode_chat([SYS, U1, A1, U2, A2])
    expect = [128000]
    expect_mask = [False]
    for m in (SYS, U1, A1, U2, A2):
        body = e(m["content"]) + [eot]
        expect += header(m["role"]) + body
        expect_mask += [False] * len(header(m["role"])) + [m["role"] == "assistant"] * len(body)
    assert ids == expect
    assert mask == expect_mask

    ids, mask = llama3.encode_chat([U1], add_generation_prompt=True)
    assert ids == [128000] + header("user") + e(U1["content"]) + [eot] + header("assistant")
    assert not any(mask)


def test_llama2_template(mistral):
    # Hand-checked ids for the smallest case: "▁[ INST ] ▁hi ▁[ / INST ]" then "▁Hello ▁" + </s>.
    # The answer starts with '▁Hello' (22557) because the whole turn is one string; encoding
    # " Hello " alone would give '▁', '▁Hello'.
    ids, mask = mistral.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}],
                                    template="llama2")
    assert ids == [1, 733, 16289, 28793, 12014, 733, 28748, 16289, 28793, 22557, 28705, 2]
    assert mask == [False] * 9 + [True] * 3

    e = mistral.encode
    first = f"[INST] <<SYS>>\n{SYS['content']}\n<</SYS>>\n\n{U1['content']} [/INST]"
    turn1 = e(first + f" {A1['content']} ")
    assert turn1[:len(e(first))] == e(first)  # whole-string encoding keeps the prompt as a prefix
    ids, mask = mistral.encode_chat([SYS, U1, A1, U2], template="llama2", add_generation_prompt=True)
    second = e(f"[INST] {U2['content']} [/INST]")
    assert ids == [1] + turn1 + [2] + [1] + second
    n_prompt = len(e(first))
    assert mask == [False] * (1 + n_prompt) + [True] * (len(turn1) - n_prompt + 1) + [False] * (1 + len(second))


def test_camelidae_template(mistral, llama3):
    for tok in (mistral, llama3):
        e = tok.encode

        def answer_ids(prompt, answer):
            # tokens the answer adds when prompt + answer is encoded as one string
            whole = e(prompt + answer)
            assert whole[:len(e(prompt))] == e(prompt)
            return whole[len(e(prompt)):]

        prompt1 = f"### System:\n{SYS['content']}\n### Human:\n{U1['content']}\n### Assistant:\n"
        prompt2 = f"### Human:\n{U2['content']}\n### Assistant:\n"
        a1, a2 = answer_ids(prompt1, A1["content"]), answer_ids(prompt2, A2["content"])
        if tok.kind == "tiktoken":
            assert a1 == e(A1["content"])  # tiktoken splits at the "\n" anyway
        else:
            assert a1 != e(A1["content"])  # alone, SentencePiece would prefix "4." with a '▁'
        ids, mask = tok.encode_chat([SYS, U1, A1, U2, A2], template="camelidae")
        assert ids == [tok.bos_id] + e(prompt1) + a1 + [tok.eos_id] + e(prompt2) + a2 + [tok.eos_id]
        assert mask == ([False] * (1 + len(e(prompt1))) + [True] * (len(a1) + 1)
                        + [False] * len(e(prompt2)) + [True] * (len(a2) + 1))
        assert ids.count(tok.bos_id) == 1  # later turns continue without a new <s>
        ids, mask = tok.encode_chat([U1], template="camelidae", add_generation_prompt=True)
        assert ids == [tok.bos_id] + e(f"### Human:\n{U1['content']}\n### Assistant:\n")
        assert not any(mask)


def test_chatml_template(bpe):
    e = bpe.encode
    im_start, im_end = bpe.special_id("<|im_start|>"), bpe.special_id("<|im_end|>")
    assert (im_start, im_end) == (301, 302)
    ids, mask = bpe.encode_chat([SYS, U1, A1, U2])  # default template of a bpe tokenizer
    expect, expect_mask = [], []
    for m in (SYS, U1, A1, U2):
        head, body = [im_start] + e(m["role"] + "\n"), e(m["content"]) + [im_end]
        expect += head + body + e("\n")
        expect_mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False]
    assert ids == expect
    assert mask == expect_mask
    ids, _ = bpe.encode_chat([U1], add_generation_prompt=True)
    assert ids[-len(e("assistant\n")) - 1:] == [im_start] + e("assistant\n")
    # no BOS in Qwen: the first token is <|im_start|>
    assert ids[0] == im_start


def test_chat_errors(mistral, llama3):
    with pytest.raises(ValueError, match="may only come first"):
        llama3.encode_chat([U1, SYS])
    with pytest.raises(ValueError, match="alternate"):
        mistral.encode_chat([U1, U2], template="llama2")
    with pytest.raises(ValueError, match="last message"):
        mistral.encode_chat([U1, A1], template="camelidae", add_generation_prompt=True)
    with pytest.raises(ValueError, match="role"):
        llama3.encode_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="unknown chat template"):
        llama3.encode_chat([U1], template="vicuna")
    with pytest.raises(KeyError, match="<|im_start|>"):
        llama3.encode_chat([U1], template="chatml")


def test_encode_plain(llama3, bpe):
    ids, mask = llama3.encode_plain("Some corpus text.")
    assert ids == [128000] + llama3.encode("Some corpus text.") + [128001]
    assert mask == [False] + [True] * (len(ids) - 1)
    ids, mask = bpe.encode_plain(" the")  # no BOS: every token is a target
    assert ids == [258, 300] and mask == [True, True]


# ------------------------------------------------------------------------------------------------
# byte-level tiktoken file (the training demo's tokenizer)

def test_byte_tokenizer(byte_tok):
    assert byte_tok.kind == "tiktoken"
    assert byte_tok.vocab_size == 512
    assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.special_id("<|eot_id|>")) == (256, 257, 265)
    assert byte_tok.stop_ids == [257, 264, 265]
    text = "héllo, 世界 🦙\n"
    assert byte_tok.encode(text) == list(text.encode("utf-8"))
    ids, mask = byte_tok.encode_chat([U1, A1])  # llama3 template with ids 256 + offset
    assert ids[:2] == [256, 262] and ids[-1] == 265 and mask[-1]


# ------------------------------------------------------------------------------------------------
# byte-level BPE (vocab.json + merges.txt)

def test_byte_table_by_hand():
    table = byte_to_unicode()
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")], table[0xAD]) == ("Ġ", "Ċ", "a", "Ń")
    assert len(set(table.values())) == 256


def test_tiny_bpe_known_ids(bpe):
    assert bpe.kind == "bpe" and bpe.template == "chatml"
    assert (bpe.bos_id, bpe.eos_id, bpe.vocab_size) == (None, 300, 303)
    assert bpe.stop_ids == [300, 302]
    # " the" -> Ġthe 258, " and" -> Ġand 262, " " 32, digits one at a time (no "12" merge
    # despite merge 265), "\n\n" -> ĊĊ 266, "中" (e4 b8 ad) -> ä¸Ń 264
    assert bpe.encode(" the and 12\n\n中") == [258, 262, 32, 49, 50, 266, 264]
    assert bpe.encode("e\u0301") == [195, 169]  # NFC first: é = c3 a9
    assert bpe.decode([258, 302]) == " the<|im_end|>"


def test_tiny_bpe_matches_hf(bpe):
    from transformers import Qwen2Tokenizer
    hf = Qwen2Tokenizer(vocab=tiny_bpe_vocab(), merges=list(MERGES))
    for text in MIXED + [" the and the other thing", "12345 then 中中 and e\u0301", "in the\n\n\nend"]:
        assert bpe.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_tiny_bpe_default_specials(tmp_path):
    # no tokenizer_config.json: Qwen's three specials follow the last id (151643.. for Qwen's vocab)
    tok = Tokenizer(write_tiny_bpe(tmp_path))
    n = 256 + len(MERGES)
    assert [tok.special_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [n, n + 1, n + 2]
    assert tok.vocab_size == n + 3


def test_tiny_bpe_errors(tmp_path):
    bad = list(MERGES) + [("x", "yz")]
    with pytest.raises(ValueError, match=r"merges.txt:13"):
        Tokenizer(write_tiny_bpe(tmp_path / "a", merges=bad))
    with pytest.raises(ValueError, match=r"merges.txt:3.*id order"):
        Tokenizer(write_tiny_bpe(tmp_path / "b", merges=[MERGES[1], MERGES[0]] + MERGES[2:]))
    folder = write_tiny_bpe(tmp_path / "c")
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer(folder)


# ------------------------------------------------------------------------------------------------
# directories, content sniffing, default templates, garbage

def test_directories_and_sniffing(tmp_path, mistral_path):
    # a SentencePiece file under any name is recognised by its content
    odd = tmp_path / "weights.bin"
    shutil.copy(mistral_path, odd)
    assert Tokenizer(str(odd)).kind == "sentencepiece"
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    shutil.copy(mistral_path, sp_dir / "tokenizer.model")
    assert Tokenizer(str(sp_dir)).kind == "sentencepiece"
    # Meta's HF repos keep the tiktoken file under original/
    meta_dir = tmp_path / "meta" / "original"
    meta_dir.mkdir(parents=True)
    write_byte_tokenizer(str(meta_dir / "tokenizer.model"))
    assert Tokenizer(str(tmp_path / "meta")).kind == "tiktoken"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        Tokenizer(str(tmp_path / "empty"))


def test_template_from_config(tmp_path):
    def folder(name, chat_template):
        d = tmp_path / name
        d.mkdir()
        write_byte_tokenizer(str(d / "tokenizer.model"))
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
        return str(d)

    assert Tokenizer(folder("named", "camelidae")).template == "camelidae"
    jinja = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert Tokenizer(folder("jinja", jinja)).template == "chatml"
    strange = folder("strange", "{{ messages }}")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer(strange)
    assert Tokenizer(strange, template="llama2").template == "llama2"
    with pytest.raises(ValueError, match="unknown chat template"):
        Tokenizer(strange, template="vicuna")


def test_garbage_files(tmp_path):
    cases = {
        "random.model": bytes(range(256)) * 8,
        "empty.model": b"",
        "text.model": b"hello world\nthis is not a tokenizer\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            Tokenizer(str(tmp_path / name))
    (tmp_path / "badline.model").write_bytes(b"AA== 0\nAQ== 1\n!!notbase64 2\n")
    with pytest.raises(ValueError, match=r"badline.model:3"):
        Tokenizer(str(tmp_path / "badline.model"))
    (tmp_path / "gaps.model").write_bytes(b"AA== 0\nAQ== 5\n")
    with pytest.raises(ValueError, match="gaps.model.*not exactly"):
        Tokenizer(str(tmp_path / "gaps.model"))
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path / "missing"))


def test_write_tokenizer_config(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ jinja }}", "added_tokens_decoder": {}}))
    read = lambda: json.loads((out / "tokenizer_config.json").read_text())  # noqa: E731
    assert write_tokenizer_config(out, src, "chatml") == str(out / "tokenizer_config.json")
    assert read() == {"chat_template": "chatml", "added_tokens_decoder": {}}  # other keys stay
    write_tokenizer_config(out, src, "chatml", keep_src_template=True)
    assert read()["chat_template"] == "{{ jinja }}"
    write_tokenizer_config(out, src, None)  # an HF export: no project template name
    assert read() == {"added_tokens_decoder": {}}
    assert write_tokenizer_config(tmp_path / "none", None, None) is None  # nothing to write
    write_tokenizer_config(out, chat_template="llama3")
    assert read() == {"chat_template": "llama3"} and os.listdir(out) == ["tokenizer_config.json"]
