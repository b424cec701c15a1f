"""train.py: the same trained weights whatever the world size, the split into accumulation, a
stop signal or a crash in the middle of a save.

Dropout stays at its defaults (0.1 on the adapters and on LoRA) in every run here, so that the
random masks matter. Runs in one process that redo the same steps are compared bit for bit; runs
with another number of ranks sum the same gradients in another order (the all-reduce), so they
are compared to fp32 rounding of a sum over the step's target tokens (tests/tolerance.py)."""

import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch

import train
from test_train import ROOT, env, losses, options, run, trainable  # noqa: F401  (env is a fixture)
from tolerance import ADAM_ULPS, assert_close

DROPOUT = ("--lora_rank", "4")  # adapter and LoRA dropout keep their defaults (0.1)


def reduction(env, steps):
    """The sums on a step's path add their rounding errors (tests/tolerance.py): the weight
    gradients sum over the step's tokens (2 rows x 4 micro-batches x 64), the backward passes the
    vocab's log-sum-exp and the FFN's dot once per layer; each step starts from the last."""
    from model import ModelConfig
    c = ModelConfig.from_preset("tiny")  # the env fixture's base
    return (2 * 4 * 64 + c.vocab_size + c.ffn_dim * c.n_layers) * steps


def torchrun(env, out, *extra, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), *options(env, out, *extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if not wait:
        return proc
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_same_weights(a, b, reduction):
    assert set(a) == set(b)
    for k in a:
        assert_close(a[k], b[k], reduction=reduction, ulps=ADAM_ULPS, name=k)


def test_dropout_seed_is_a_function_of_the_data_position():
    seeds = {train.dropout_seed(1337, row) for row in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert train.dropout_seed(1337, 8) == train.dropout_seed(1337, 8) != train.dropout_seed(1338, 8)


def test_ddp_with_dropout_matches_one_process_with_more_accumulation(env):
    # 2 ranks x 2 micro-steps against 1 rank x 4: the same rows per step, so the same masks
    ddp_out, single_out = env["dir"] / "ddp-dropout", env["dir"] / "single-dropout"
    torchrun(env, ddp_out, *DROPOUT, "--max_iters", "4")
    run(env, single_out, *DROPOUT, "--max_iters", "4", "--grad_accum_steps", "4")
    assert_same_weights(trainable(ddp_out), trainable(single_out), reduction(env, 4))
    la, lb = losses(ddp_out), losses(single_out)
    assert la.keys() == lb.keys() == {1, 2, 3, 4}
    for i in la:
        assert_close(la[i], lb[i], dtype=torch.float32, reduction=reduction(env, i), name=f"loss {i}")


def test_resume_on_another_world_size(env, capfd):
    # saved by 1 process x 4 micro-steps, resumed on 2 processes x 2: the uninterrupted run
    straight, moved = env["dir"] / "straight-1x4", env["dir"] / "moved-1x4-2x2"
    run(env, straight, *DROPOUT, "--max_iters", "5", "--grad_accum_steps", "4")
    run(env, moved, *DROPOUT, "--max_iters", "2", "--grad_accum_steps", "4")
    capfd.readouterr()
    output = torchrun(env, moved, *DROPOUT, "--max_iters", "5", "--grad_accum_steps", "2", "--resume")
    assert "resumed at iteration 2" in output and "warning" not in output.lower()
    assert_same_weights(trainable(straight), trainable(moved), reduction(env, 5))
    assert sorted(losses(moved)) == [1, 2, 3, 4, 5]

    # other rows per step is another run: a clear error that names the option to change
    with pytest.raises(ValueError, match=r"8 rows per optimizer step, now .* x 1 rank = 4; pass --grad_accum_steps 4"):
        train.train(*train.parse_args(["--out_dir", str(moved), "--resume", "--grad_accum_steps", "2",
                                       "--max_iters", "6"]))


def test_a_crash_in_the_middle_of_a_save_keeps_the_previous_state(env, monkeypatch):
    straight, crashed = env["dir"] / "straight-6", env["dir"] / "crashed"
    run(env, straight, *DROPOUT, "--max_iters", "6")
    run(env, crashed, *DROPOUT, "--max_iters", "3")
    before = {k: v.clone() for k, v in trainable(crashed).items()}

    # the next save fails after trainable.safetensors is written, before optimizer.pt
    real_save = torch.save

    def failing_save(obj, path, *a, **kw):
        if os.path.basename(str(path)) == "optimizer.pt":
            raise OSError("disk full (injected)")
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        train.train(*train.parse_args(["--out_dir", str(crashed), "--resume", "--max_iters", "6",
                                       "--save_interval", "1"]))
    monkeypatch.setattr(torch, "save", real_save)
    state = json.load(open(crashed / "train_state" / "state.json"))
    assert state["iter"] == 3 and all(torch.equal(before[k], v) for k, v in trainable(crashed).items())
    assert not [n for n in os.listdir(crashed) if n.startswith(".tmp-")]  # nothing half-written left

    train.train(*train.parse_args(["--out_dir", str(crashed), "--resume", "--max_iters", "6"]))
    a, b = trainable(straight), trainable(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process, the same steps: bit for bit


def test_kill_9_during_a_save_then_resume(env):
    # a real process killed with SIGKILL while it writes the state of iteration 2 (held there by a
    # slow torch.save, so the kill lands inside the save): what is on disk is iteration 1, whole
    out, straight = env["dir"] / "kill9", env["dir"] / "kill9-straight"
    argv = options(env, out, *DROPOUT, "--max_iters", "4", "--save_interval", "1", "--eval_interval", "0")
    code = (f"import sys, time, torch; sys.path.insert(0, {ROOT!r}); real, calls = torch.save, []\n"
            "def slow(*a, **kw):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2:\n"
            "        print('SAVING', flush=True); time.sleep(120)\n"
            "    return real(*a, **kw)\n"
            f"torch.save = slow\nimport train\ntrain.main({argv!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(proc, "SAVING")
    assert any(n.startswith(".tmp-train_state-") for n in os.listdir(out))  # the kill lands mid-save
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.load(open(out / "train_state" / "state.json"))["iter"] == 1

    train.train(*train.parse_args(["--out_dir", str(out), "--resume"]))
    run(env, straight, *DROPOUT, "--max_iters", "4", "--save_interval", "1", "--eval_interval", "0")
    a, b = trainable(straight), trainable(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_between_the_renames_resumes_from_the_old_state(env):
    # replace_dir renames train_state to train_state.old, then the new one in: a crash in between
    # leaves only the .old one (and the finished temporary directory)
    straight, crashed = env["dir"] / "straight-4", env["dir"] / "between"
    run(env, straight, *DROPOUT, "--max_iters", "4")
    run(env, crashed, *DROPOUT, "--max_iters", "2")
    os.rename(crashed / "train_state", crashed / "train_state.old")
    os.makedirs(crashed / ".tmp-train_state-x")
    train.train(*train.parse_args(["--out_dir", str(crashed), "--resume", "--max_iters", "4"]))
    a, b = trainable(straight), trainable(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(crashed / "train_state.old") and not os.path.exists(crashed / ".tmp-train_state-x")


def test_a_crash_while_exporting_never_leaves_a_mixed_checkpoint(env, monkeypatch):
    from safetensors.torch import load_file

    from model import Transformer

    straight, crashed = env["dir"] / "export-straight", env["dir"] / "export-crash"
    run(env, straight, *DROPOUT, "--max_iters", "3")
    run(env, crashed, *DROPOUT, "--max_iters", "2")  # a finished export of iteration 2 is there
    real_replace = os.replace

    def failing_replace(src, dst):  # every file of the new export is moved in but config.json
        if os.path.basename(dst) == "config.json":
            raise OSError("killed (injected)")
        return real_replace(src, dst)
    monkeypatch.setattr(train.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        train.train(*train.parse_args(["--out_dir", str(crashed), "--resume", "--max_iters", "3"]))
    monkeypatch.setattr(train.os, "replace", real_replace)
    # new weights beside the old config.json would load as a checkpoint that never existed
    assert not os.path.exists(crashed / "config.json")
    with pytest.raises(FileNotFoundError):
        Transformer.from_pretrained(str(crashed))

    # --resume at the last iteration only writes what is missing: the export
    train.train(*train.parse_args(["--out_dir", str(crashed), "--resume"]))
    a, b = load_file(straight / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Transformer.from_pretrained(str(crashed)).config.moe.num_experts == 4


def wait_for(proc, text, timeout=120):
    """Read proc's output until a line contains text; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{text!r} never came:\n" + "".join(seen)[-3000:])


def stopped_iteration(output):
    line = next(line for line in output.splitlines() if line.startswith("stopped by"))
    return int(line.split("after iteration ")[1].split(";")[0])


def test_sigterm_saves_and_resume_equals_the_uninterrupted_run(env):
    out, straight = env["dir"] / "sigterm", env["dir"] / "sigterm-straight"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *options(env, out, *DROPOUT, "--max_iters", "100000", "--eval_interval", "0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = wait_for(proc, "iter 2:")
    proc.send_signal(signal.SIGTERM)
    output = seen + proc.communicate(timeout=120)[0]
    assert proc.returncode == train.PREEMPTED, output[-3000:]
    k = stopped_iteration(output)
    assert k >= 2 and f"train.py --out_dir {out} --resume" in output
    assert json.load(open(out / "train_state" / "state.json"))["iter"] == k

    train.train(*train.parse_args(["--out_dir", str(out), "--resume", "--max_iters", str(k + 2)]))
    run(env, straight, *DROPOUT, "--max_iters", str(k + 2), "--eval_interval", "0")
    a, b = trainable(straight), trainable(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(out)


def children(pid):
    """Processes whose parent is pid, with their environment's RANK."""
    found = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{p}/environ", "rb") as f:
                    environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                found[int(p)] = int(environ.get(b"RANK", b"-1"))
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc (Linux)")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(env):
    out, straight = env["dir"] / "sigterm-ddp", env["dir"] / "sigterm-ddp-straight"
    proc = torchrun(env, out, *DROPOUT, "--max_iters", "100000", "--eval_interval", "0", wait=False)
    seen = wait_for(proc, "iter 2:")
    ranks = {}
    for _ in range(50):  # the workers are torchrun's children
        ranks = children(proc.pid)
        if sorted(ranks.values()) == [0, 1]:
            break
        time.sleep(0.1)
    rank1 = next(pid for pid, rank in ranks.items() if rank == 1)
    os.kill(rank1, signal.SIGTERM)  # rank 0 never sees a signal: the step's all-reduce tells it
    output = seen + proc.communicate(timeout=120)[0]
    k = stopped_iteration(output)
    assert "a stop signal on another rank" in output
    state = json.load(open(out / "train_state" / "state.json"))
    assert state["iter"] == k and state["world_size"] == 2

    # resume on one process with twice the accumulation: equal to the uninterrupted run
    train.train(*train.parse_args(["--out_dir", str(out), "--resume", "--max_iters", str(k + 1),
                                   "--grad_accum_steps", "4"]))
    run(env, straight, *DROPOUT, "--max_iters", str(k + 1), "--eval_interval", "0", "--grad_accum_steps", "4")
    assert_same_weights(trainable(straight), trainable(out), reduction(env, k + 1))


def test_a_state_written_before_the_restructure_resumes(env):
    # train_state/state.json as the previous version wrote it: no format, the fingerprint sampled
    # another way, options under their old names and spellings (init_from, top_k, bfloat16-style
    # dtypes, lora_targets as one string); it resumes and equals the uninterrupted run
    straight, old = env["dir"] / "straight-old", env["dir"] / "old-state"
    run(env, straight, *DROPOUT, "--max_iters", "4")
    run(env, old, *DROPOUT, "--max_iters", "2")
    path = old / "train_state" / "state.json"
    state = json.loads(path.read_text())
    del state["format"], state["dtype"]
    state["base_fingerprint"] = "0" * 64
    options = state["options"]
    options["init_from"], options["top_k"] = options.pop("ckpt"), options.pop("experts_per_token")
    options["dtype"], options["lora_targets"] = "float32", ",".join(options["lora_targets"])
    path.write_text(json.dumps(state))
    train.train(*train.parse_args(["--out_dir", str(old), "--resume", "--max_iters", "4"]))
    a, b = trainable(straight), trainable(old)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a state of this version is checked: another base is refused
    with pytest.raises(ValueError, match="is not the checkpoint"):
        other = env["dir"] / "other-base"
        from model import ModelConfig, Transformer
        torch.manual_seed(1)
        Transformer(ModelConfig.from_preset("tiny")).save_pretrained(other)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            (other / name).write_bytes((Path(env["base"]) / name).read_bytes())
        train.train(*train.parse_args(["--out_dir", str(old), "--resume", "--max_iters", "5", "--ckpt", str(other)]))
