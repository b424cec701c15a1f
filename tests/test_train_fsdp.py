"""train.py --fsdp: the same trained weights as DDP and as one process, sharded training state that
resumes on another world size and with or without --fsdp, the gathered export, more than one node.

Every run keeps the default dropout (0.1 on adapters and LoRA), so the masks matter. Runs on
another number of ranks sum the gradients in another order, so they are compared to fp32 rounding
of a sum over the step's target tokens (tests/tolerance.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from model import Transformer
from test_train import ROOT, env, losses, metrics, options, run  # noqa: F401  (env is a fixture)
from test_train_resume import DROPOUT, assert_same_weights, reduction, torchrun
from tolerance import assert_close

STEPS = 5  # every run below ends at this iteration, with 8 rows per step


def state_tensors(out, tmp):
    """The trainable tensors of out/train_state, whether one process (safetensors) or FSDP
    (torch.distributed.checkpoint) wrote it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = os.path.join(out, "train_state")
    if not os.path.isdir(os.path.join(state, checkpoint.SHARDED)):
        return load_file(os.path.join(state, "trainable.safetensors"))
    dst = os.path.join(tmp, os.path.basename(str(out)) + ".pt")
    dcp_to_torch_save(os.path.join(state, checkpoint.SHARDED), dst)
    return torch.load(dst, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight(env):
    """One process, 4 micro-batches per step, uninterrupted: what every run here must equal."""
    out = env["dir"] / "fsdp-straight"
    run(env, out, *DROPOUT, "--max_iters", str(STEPS), "--grad_accum_steps", "4")
    return out


def test_fsdp_equals_ddp_and_one_process(env, straight, tmp_path):
    fsdp, ddp = env["dir"] / "fsdp-2x2", env["dir"] / "ddp-2x2"
    output = torchrun(env, fsdp, *DROPOUT, "--max_iters", str(STEPS), "--fsdp")
    assert "warning" not in output.lower()
    torchrun(env, ddp, *DROPOUT, "--max_iters", str(STEPS))
    assert os.path.isdir(fsdp / "train_state" / checkpoint.SHARDED)  # each rank wrote its shards
    assert not os.path.exists(fsdp / "train_state" / "trainable.safetensors")
    single = state_tensors(straight, tmp_path)
    assert_same_weights(state_tensors(fsdp, tmp_path), single, reduction(env, STEPS))
    assert_same_weights(state_tensors(ddp, tmp_path), single, reduction(env, STEPS))
    la, lb = losses(fsdp), losses(straight)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    for i in la:
        assert_close(la[i], lb[i], dtype=torch.float32, reduction=reduction(env, i), name=f"loss {i}")

    # the export, gathered one tensor at a time: the ordinary checkpoint, LoRA merged
    a, b = load_file(fsdp / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    for k in a:
        assert_close(a[k], b[k], reduction=reduction(env, STEPS), name=k)
    assert Transformer.from_pretrained(str(fsdp)).config.lora is None
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(fsdp), "--prompt", "add",
                             "--max_new_tokens", "3", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr[-2000:]
    hf = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--ckpt", str(fsdp),
                         "--out_dir", str(tmp_path / "hf"), "--to", "hf"], capture_output=True, text=True, timeout=120)
    assert hf.returncode == 0, hf.stderr[-2000:]


def test_fsdp_with_grad_checkpointing_equals_one_process(env, straight, tmp_path):
    out = env["dir"] / "fsdp-ckpt"
    torchrun(env, out, *DROPOUT, "--max_iters", str(STEPS), "--fsdp", "--grad_checkpointing")
    assert_same_weights(state_tensors(out, tmp_path), state_tensors(straight, tmp_path), reduction(env, STEPS))


def test_resume_across_world_sizes_with_and_without_fsdp(env, straight, tmp_path, capfd):
    out = env["dir"] / "fsdp-hops"
    more = lambda it: (*DROPOUT, "--max_iters", str(it), "--resume")  # noqa: E731
    torchrun(env, out, *DROPOUT, "--max_iters", "1", "--fsdp")  # FSDP, 2 ranks: sharded state
    capfd.readouterr()
    run(env, out, *more(2), "--grad_accum_steps", "4")  # -> one process, no FSDP (2 -> 1)
    assert "resumed at iteration 1" in capfd.readouterr().out
    assert os.path.isfile(out / "train_state" / "trainable.safetensors")
    output = torchrun(env, out, *more(3), "--fsdp")  # -> FSDP on 2 ranks (1 -> 2), from safetensors
    assert "resumed at iteration 2" in output and "warning" not in output.lower()
    output = torchrun(env, out, *more(4), "--fsdp", "--grad_accum_steps", "4", nproc=1)  # sharded 2 -> 1
    assert "resumed at iteration 3" in output
    output = torchrun(env, out, *more(STEPS), "--grad_accum_steps", "2")  # -> DDP on 2 ranks (1 -> 2)
    assert "resumed at iteration 4" in output
    assert_same_weights(state_tensors(out, tmp_path), state_tensors(straight, tmp_path), reduction(env, STEPS))
    assert sorted(losses(out)) == list(range(1, STEPS + 1))


def test_a_failed_sharded_save_keeps_the_previous_state(env, straight, tmp_path):
    # rank 1 fails while writing its shards of iteration 2: every rank stops, iteration 1 stays
    out = env["dir"] / "fsdp-crash"
    torchrun(env, out, *DROPOUT, "--max_iters", "1", "--fsdp")
    script = tmp_path / "failing.py"
    script.write_text(
        f"import os, sys; sys.path.insert(0, {ROOT!r})\n"
        "from torch.distributed.checkpoint import FileSystemWriter\n"
        "real = FileSystemWriter.write_data\n"
        "def write_data(self, plan, planner):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise OSError('disk full (injected)')\n"
        "    return real(self, plan, planner)\n"
        "FileSystemWriter.write_data = write_data\n"
        "import train\ntrain.main(sys.argv[1:])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *options(env, out, *DROPOUT, "--max_iters", str(STEPS), "--resume", "--fsdp", "--save_interval", "1")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "injected" in proc.stdout + proc.stderr
    assert json.load(open(out / "train_state" / "state.json"))["iter"] == 1
    output = torchrun(env, out, *DROPOUT, "--max_iters", str(STEPS), "--resume", "--fsdp")
    assert "resumed at iteration 1" in output
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert_same_weights(state_tensors(out, tmp_path), state_tensors(straight, tmp_path), reduction(env, STEPS))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_equal_one_process(env, straight, tmp_path):
    # two torchrun agents meet through a c10d rendezvous, as two machines would (README recipe)
    out = env["dir"] / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=pesc-test",
                               os.path.join(ROOT, "train.py"),
                               *options(env, out, *DROPOUT, "--max_iters", str(STEPS), "--fsdp")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert json.load(open(out / "train_state" / "state.json"))["world_size"] == 2
    assert_same_weights(state_tensors(out, tmp_path), state_tensors(straight, tmp_path), reduction(env, STEPS))


def test_fsdp_needs_torchrun(env):
    with pytest.raises(SystemExit, match=r"torchrun --standalone --nproc_per_node=NUM_GPUS train.py --fsdp"):
        run(env, env["dir"] / "no-torchrun", "--fsdp")


def test_resume_of_a_sharded_state_with_other_model_options_is_refused(env, tmp_path):
    out = env["dir"] / "fsdp-other-options"
    torchrun(env, out, *DROPOUT, "--max_iters", "1", "--fsdp")
    with pytest.raises(ValueError, match="--adapter_dim is 16 but the run .* used 8"):
        run(env, out, *DROPOUT, "--max_iters", "2", "--resume", "--adapter_dim", "16")
    # a state whose tensors are not the model's (edited, or from other code): named, not loaded
    state = json.load(open(out / "train_state" / "state.json"))
    name = next(iter(state["shapes"]))
    state["shapes"][name] = [3, 3]
    json.dump(state, open(out / "train_state" / "state.json", "w"))
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 3\).*other model options"):
        run(env, out, *DROPOUT, "--max_iters", "2", "--resume", "--grad_accum_steps", "4")


def test_fsdp_shards_an_nf4_base_and_equals_ddp(env, tmp_path):
    # QLoRA under FSDP: the packed NF4 bytes are sharded like any frozen weight, all-gathered per
    # block (again for the recompute with --grad_checkpointing); the same weights as DDP
    steps, nf4 = 3, ("--quantize", "nf4")
    ddp = env["dir"] / "ddp-nf4"
    torchrun(env, ddp, *DROPOUT, *nf4, "--max_iters", str(steps))
    expected = state_tensors(ddp, tmp_path)
    for extra in ((), ("--grad_checkpointing",)):
        out = env["dir"] / f"fsdp-nf4{'-ckpt' if extra else ''}"
        output = torchrun(env, out, *DROPOUT, *nf4, "--max_iters", str(steps), "--fsdp", *extra)
        assert "NF4 base sharded over 2 ranks" in output and "warning" not in output.lower()
        assert_same_weights(state_tensors(out, tmp_path), expected, reduction(env, steps))
    # the export: the full-precision base of init_from with LoRA merged, as DDP's
    a, b = load_file(out / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k or "storage" in k for k in a)
    for k in a:
        assert_close(a[k], b[k], reduction=reduction(env, steps), name=k)


def test_fsdp_with_the_triton_kernels_equals_one_process(env, tmp_path, monkeypatch):
    # the path a GPU takes (PESC_KERNELS=triton runs it here in the interpreter): the fused LM head
    # + loss reads the LM head's weight through LMHead.loss, which FSDP must gather like a forward
    monkeypatch.setenv("PESC_KERNELS", "triton")
    no_dropout = ("--lora_rank", "4", "--adapter_dropout", "0", "--lora_dropout", "0", "--max_iters", "1",
                  "--eval_interval", "0")
    fsdp, single = env["dir"] / "fsdp-triton", env["dir"] / "single-triton"
    torchrun(env, fsdp, *no_dropout, "--fsdp")
    run(env, single, *no_dropout, "--grad_accum_steps", "4")
    # The step's loss and gradient norm, both sums over the whole step. Not the weights after one
    # AdamW step: it divides each gradient element by its own size, so an element whose gradient
    # is near AdamW's eps (1e-8) carries that gradient's rounding into the update unscaled.
    (a,), (b,) = ([r for r in metrics(out) if r.get("iter") == 1 and "loss" in r] for out in (fsdp, single))
    for key in ("loss", "grad_norm", "aux_loss"):
        assert_close(a[key], b[key], dtype=torch.float32, reduction=reduction(env, 1), name=key)
    assert a["grad_norm"] > 0
