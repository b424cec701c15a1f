"""train.py: options, what each mode trains, exact resume, DDP == accumulation, non-finite stop, export."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import moe
import train
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, write_byte_tokenizer
from tolerance import ADAM_ULPS, assert_close, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_base(d):
    """Write into d a tiny dense checkpoint with the byte tokenizer (llama3 template) and a small
    chat JSONL: {"dir", "base", "data"}."""
    torch.manual_seed(0)
    base = str(d / "base")
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(base)
    write_byte_tokenizer(os.path.join(base, "tokenizer.model"))
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "llama3"}, f)
    data = str(d / "data.jsonl")
    with open(data, "w") as f:
        for i in range(40):
            messages = [{"role": "user", "content": f"add {i} and {i % 7}"},
                        {"role": "assistant", "content": str(i + i % 7)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"dir": d, "base": base, "data": data}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """tiny_base, plus a second source (ShareGPT) for mixtures."""
    env = tiny_base(tmp_path_factory.mktemp("train"))
    d = env["dir"]
    other = str(d / "other.jsonl")
    with open(other, "w") as f:
        for i in range(20):
            turns = [{"from": "human", "value": f"double {i}"}, {"from": "gpt", "value": str(2 * i)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return {**env, "mix": f"{env['data']}:0.7,{other}:0.3"}


def options(env, out, *extra):
    return ["--ckpt", env["base"], "--data", env["data"], "--out_dir", str(out), "--device", "cpu",
            "--num_experts", "4", "--experts_per_token", "2", "--adapter_dim", "8", "--lora_rank", "0", "--seq_len", "64",
            "--batch_size", "2", "--grad_accum_steps", "2", "--max_iters", "3", "--lr", "1e-2",
            "--warmup_iters", "2", "--log_interval", "1", "--eval_interval", "2", "--save_interval", "0",
            "--val_fraction", "0.1", "--cache_dir", str(env["dir"] / "cache"), *extra]


def run(env, out, *extra):
    return train.train(*train.parse_args(options(env, out, *extra)))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {r["iter"]: r["loss"] for r in metrics(out) if "loss" in r}


def trainable(out):
    return load_file(os.path.join(out, "train_state", "trainable.safetensors"))


def is_pesc_param(name):
    return name.endswith(("router.weight", "adapter_down", "adapter_up"))


# -----------------------------------------------------------------------------
# Options


def test_options():
    args, given = train.parse_args([])
    # the official PESC recipe (the paper's training script)
    assert (args.lr, args.lr_schedule, args.warmup_iters, args.beta2, args.weight_decay, args.grad_clip) == \
        (2e-4, "constant", 200, 0.999, 0.0, 0.3)
    assert (args.num_experts, args.experts_per_token, args.adapter_dim, args.adapter_scaling, args.adapter_dropout) == \
        (8, 2, 512, 0.25, 0.1)
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout, args.seq_len, args.epochs) == (64, 16.0, 0.1, 512, 1.0)
    assert given == set()
    args, given = train.parse_args(["--pack", "false"])
    assert args.pack is False and given == {"pack"}
    assert train.parse_args(["--compile"])[0].compile is True
    for bad in (["--bogus", "1"], ["--lr_schedul", "cosine"], ["--mode", "dense"], ["--pack", "maybe"], ["--no_pack"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_old_option_names_still_work_with_a_note(capsys):
    # renamed options (scripts and shell histories use the old ones): read as the new, one line each
    old = ["--init_from", "ckpt/x", "--top_k", "4", "--dtype", "bfloat16"]
    args, given = train.parse_args(old)
    assert (args.ckpt, args.experts_per_token, args.dtype) == ("ckpt/x", 4, "bf16")
    assert given == {"ckpt", "experts_per_token", "dtype"}
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: --init_from is now --ckpt", "note: --top_k is now --experts_per_token",
                     "note: --dtype bfloat16 is now spelled bf16"]
    assert train.parse_args(["--top_k=3"])[0].experts_per_token == 3
    assert not hasattr(args, "top_k") and not hasattr(args, "init_from")  # one meaning per name
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "fp16"])  # no loss scaler: training takes fp32 or bf16


def test_pesc_and_lora_options_come_from_their_configs():
    args, _ = train.parse_args(["--num_experts", "16", "--experts_per_token", "4", "--lora_rank", "8",
                                "--lora_targets", "q,v"])
    assert train.pesc_config(args) == moe.PESCConfig(num_experts=16, top_k=4)
    assert train.lora_config(args) == moe.LoRAConfig(rank=8, targets=("q", "v"))
    assert train.lora_config(train.parse_args(["--lora_rank", "0"])[0]) is None
    defaults, _ = train.parse_args([])
    assert train.pesc_config(defaults) == moe.PESCConfig() and train.lora_config(defaults) == moe.LoRAConfig()


def test_lr_schedule():
    args, _ = train.parse_args(["--lr", "1.0", "--min_lr", "0.1", "--warmup_iters", "4", "--lr_schedule", "cosine"])
    assert [train.get_lr(i, 14, args) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert train.get_lr(4, 14, args) == 1.0
    assert_close(train.get_lr(9, 14, args), 0.55)  # a cosine, a product, a sum: a few float64 roundings
    assert_close(train.get_lr(14, 14, args), 0.1)
    args.lr_schedule = "constant"
    assert train.get_lr(13, 14, args) == 1.0


# -----------------------------------------------------------------------------
# What each mode trains


def test_bf16_run_exports_the_frozen_base_unrounded(env):
    # training holds frozen weights in the compute dtype; the export must not round the fp32 base
    out = env["dir"] / "bf16"
    run(env, out, "--dtype", "bf16")
    base = load_file(os.path.join(env["base"], "model.safetensors"))
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], base[k]) for k in base)


def test_pesc_run_trains_only_routers_and_adapters(env, capsys):
    out = env["dir"] / "pesc"
    summary = run(env, out)
    printed = capsys.readouterr().out
    assert "  --lr 0.01" in printed and "  --adapter_dim 8" in printed  # every option printed at start
    state = json.load(open(out / "train_state" / "state.json"))
    assert state["iter"] == 3 and state["options"]["adapter_dim"] == 8
    names = set(trainable(out))
    assert names and all(is_pesc_param(n) for n in names) and len(names) == 3 * 2  # 3 tensors x 2 layers

    # the export: a standalone PESC checkpoint whose base tensors are the dense ones, bit for bit
    base = load_file(os.path.join(env["base"], "model.safetensors"))
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(base) | names
    assert all(torch.equal(exported[k], base[k]) for k in base)
    assert all(exported[k].abs().sum() > 0 for k in names if k.endswith("adapter_up"))  # moved off U_e = 0
    model = Transformer.from_pretrained(str(out))
    assert model.config.moe.num_experts == 4 and model.config.moe.adapter_dim == 8
    assert Tokenizer(str(out)).template == "llama3"

    # the log: LM loss, aux loss, lr, grad norm, tokens/s, expert load, and held-out loss
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"aux_loss", "lr", "grad_norm", "tokens_per_sec", "load_max_over_mean", "expert_load"} <= set(r)
        # the log rounds each of the 4 shares to 4 decimals; the shares themselves are fp32
        share_sum = sum(r["expert_load"][0])
        assert len(r["expert_load"]) == 2 and abs(share_sum - 1.0) <= 4 * 0.5e-4 + tolerance(1.0, torch.float32, 4)
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 3]
    assert summary["val_loss"] == records[-1]["val_loss"]

    # convert.py reads it back out to Hugging Face's layout
    import convert
    convert.main(["--ckpt", str(out), "--out_dir", str(env["dir"] / "pesc-hf"), "--to", "hf"])
    assert os.path.isfile(env["dir"] / "pesc-hf" / "config.json")


def test_pesc_with_lora_and_the_dense_baselines(env):
    base = load_file(os.path.join(env["base"], "model.safetensors"))
    lora_names = {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for ab in "ab"
                  for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}

    out = env["dir"] / "pesc-lora"
    run(env, out, "--lora_rank", "4", "--max_iters", "2")
    names = set(trainable(out))
    assert {n for n in names if not is_pesc_param(n)} == lora_names
    exported = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in exported)  # merged into the base weights
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed == {n.rsplit(".", 1)[0] + ".weight" for n in lora_names}  # norms, embeddings untouched
    assert Transformer.from_pretrained(str(out)).config.lora is None

    out = env["dir"] / "lora"
    run(env, out, "--mode", "lora", "--lora_rank", "4", "--max_iters", "2")
    assert set(trainable(out)) == lora_names
    model = Transformer.from_pretrained(str(out))
    assert model.config.moe is None  # the dense baseline stays dense

    out = env["dir"] / "full"
    run(env, out, "--mode", "full", "--max_iters", "2")
    exported = load_file(out / "model.safetensors")
    assert set(trainable(out)) == set(base) and set(exported) == set(base)
    assert all(not torch.equal(exported[k], base[k]) for k in base)


def test_continue_a_pesc_checkpoint(env):
    first = env["dir"] / "pesc-1"
    run(env, first, "--max_iters", "1")
    out = env["dir"] / "pesc-2"
    train.train(*train.parse_args(options(env, out, "--max_iters", "1", "--ckpt", str(first),
                                          "--num_experts", "8")))  # the checkpoint's 4 experts win
    before, after = load_file(first / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after) and after["layers.0.feed_forward.router.weight"].shape[0] == 4
    assert all(torch.equal(before[k], after[k]) for k in before if not is_pesc_param(k))
    assert not torch.equal(before["layers.0.feed_forward.adapter_up"], after["layers.0.feed_forward.adapter_up"])
    with pytest.raises(ValueError, match="PESC checkpoint"):
        train.train(*train.parse_args(options(env, env["dir"] / "x", "--ckpt", str(first), "--mode", "lora",
                                              "--lora_rank", "4")))


def test_grad_checkpointing_changes_nothing(env):
    # with dropout on: the recomputation must replay the same masks
    extra = ("--max_iters", "2", "--adapter_dropout", "0.1", "--lora_rank", "4")
    run(env, env["dir"] / "plain", *extra)
    run(env, env["dir"] / "ckpt", *extra, "--grad_checkpointing")
    a, b = trainable(env["dir"] / "plain"), trainable(env["dir"] / "ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same ops on the same values: bit for bit
    assert losses(env["dir"] / "plain") == losses(env["dir"] / "ckpt")


# -----------------------------------------------------------------------------
# Resume, DDP, non-finite loss


def test_resume_is_exact(env):
    # dropout on everywhere and a warmup, so that RNG states and the schedule position matter
    extra = ("--adapter_dropout", "0.1", "--lora_rank", "4", "--lora_dropout", "0.1", "--warmup_iters", "4")
    straight, split = env["dir"] / "straight", env["dir"] / "split"
    run(env, straight, *extra, "--max_iters", "6")
    run(env, split, *extra, "--max_iters", "3")
    train.train(*train.parse_args(["--out_dir", str(split), "--resume", "--max_iters", "6"]))
    assert losses(straight) == losses(split) and sorted(losses(split)) == [1, 2, 3, 4, 5, 6]
    a, b = trainable(straight), trainable(split)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: the same computation
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a resumed run must be the same run: other options, or another base checkpoint, are refused
    with pytest.raises(ValueError, match="--lr is 0.001 but the run .* used 0.01"):
        train.train(*train.parse_args(["--out_dir", str(split), "--resume", "--lr", "1e-3"]))
    other = env["dir"] / "other-base"
    torch.manual_seed(1)
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(str(other))
    write_byte_tokenizer(str(other / "tokenizer.model"))
    with pytest.raises(ValueError, match="is not the checkpoint the run .* started from"):
        train.train(*train.parse_args(["--out_dir", str(split), "--resume", "--ckpt", str(other)]))


def test_ddp_matches_one_process_with_more_accumulation(env):
    # 2 ranks x 2 micro-steps against 1 rank x 4: the same rows per step, so the same updates
    extra = ("--lora_rank", "4", "--adapter_dropout", "0", "--lora_dropout", "0", "--max_iters", "3")
    ddp_out, single_out = env["dir"] / "ddp", env["dir"] / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *options(env, ddp_out, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run(env, single_out, *extra, "--grad_accum_steps", "4")
    a, b = trainable(ddp_out), trainable(single_out)
    assert set(a) == set(b)
    # fp32: the all-reduce sums the two ranks' gradients in another order than accumulation does.
    # Reduction (tolerance.py): the sums along a step's path add their errors: the weight gradients
    # sum over the step's tokens (2 rows x 4 micro-steps x 64), the backward passes the vocab's
    # log-sum-exp and the FFN's dot once per layer; once per step, as each starts from the last
    c = Transformer.from_pretrained(env["base"]).config
    reduction = (2 * 4 * 64 + c.vocab_size + c.ffn_dim * c.n_layers) * 3
    for k in a:
        assert_close(a[k], b[k], reduction=reduction, ulps=ADAM_ULPS, name=k)
    la, lb = losses(ddp_out), losses(single_out)
    assert la.keys() == lb.keys() == {1, 2, 3}
    for i in la:
        assert_close(la[i], lb[i], dtype=torch.float32, reduction=reduction, name=f"loss at iter {i}")


def test_ddp_mixture_reads_the_rows_of_one_process(env):
    # A mixture and a fresh token cache: rank 1 waits for rank 0 to build it, then maps it. Before
    # the first update both runs compute the same model on the same rows: the held-out loss of
    # each source and the first step's loss agree to fp32 rounding.
    extra = ("--lora_rank", "0", "--adapter_dropout", "0", "--max_iters", "1", "--eval_interval", "1",
             "--data", env["mix"])
    ddp_out, single_out = env["dir"] / "ddp-mix", env["dir"] / "single-mix"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *options(env, ddp_out, *extra, "--cache_dir", str(env["dir"] / "mix-cache"))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "token cache: building" in proc.stdout and len(os.listdir(env["dir"] / "mix-cache")) == 1
    run(env, single_out, *extra, "--grad_accum_steps", "4")
    a, b = metrics(ddp_out), metrics(single_out)
    sources = [p.rsplit(":", 1)[0] for p in env["mix"].split(",")]
    evals_a, evals_b = [r for r in a if "val_loss" in r], [r for r in b if "val_loss" in r]
    assert [r["iter"] for r in evals_a] == [r["iter"] for r in evals_b] == [0, 1]
    assert all(list(r["val_loss_by_source"]) == sources for r in evals_a + evals_b)  # every eval, every source

    def before_the_update(records):
        first_eval, first_step = records[0], next(r for r in records if "loss" in r)
        return torch.tensor([first_eval["val_loss"], *first_eval["val_loss_by_source"].values(), first_step["loss"]])
    got, expected = before_the_update(a), before_the_update(b)
    assert_close(got, expected, dtype=torch.float32, reduction=2 * 64 * 64)  # summed over layers' dots and tokens


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env):
    out = env["dir"] / "nan"
    # an absurd learning rate: after the first update the logits overflow fp32
    with pytest.raises(RuntimeError, match=r"iteration (\d+): loss .* not finite") as e:
        run(env, out, "--mode", "full", "--lr", "1e30", "--warmup_iters", "0", "--max_iters", "5",
            "--save_interval", "1")
    failed = int(e.value.args[0].split(":")[0].split()[-1])
    state = json.load(open(out / "train_state" / "state.json"))
    assert state["iter"] == failed - 1 and f"(iteration {failed - 1})" in e.value.args[0]
    assert all(torch.isfinite(t).all() for t in trainable(out).values())


def test_bf16_autocast_with_fp32_master_weights(env):
    # What a GPU run does by default, here on the CPU: frozen weights stored in bf16, trainable
    # tensors kept in fp32 for AdamW, the forward under bf16 autocast. (Needs moe.adapter_experts
    # to compute in the activations' dtype: the custom backward passes run outside autocast.)
    out = env["dir"] / "bf16"
    run(env, out, "--dtype", "bf16", "--lora_rank", "4", "--max_iters", "2", "--seq_len", "48",
        "--batch_size", "1", "--grad_accum_steps", "1", "--val_fraction", "0")
    assert all(t.dtype == torch.float32 for t in trainable(out).values())
    assert all(math.isfinite(x) for x in losses(out).values())
    exported = load_file(out / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float32}  # the base checkpoint's dtype
