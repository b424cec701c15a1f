"""moe.py: the fast sorted path vs the reference loop, load balancing, upcycling, LoRA, the model
each training mode trains."""

import pytest
import torch
import torch.nn.functional as F

import moe
from model import ModelConfig, Transformer
from moe import LoRAConfig, PESCConfig, adapter_experts_loop, adapter_experts_sorted, route, router_losses, upcycle
from tolerance import assert_close, tolerance


def make_case(N, D, E, r, k, seed=0, experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, requires_grad=True)  # router input
    y = torch.randn(N, D, generator=g, requires_grad=True)  # FFN output
    router = torch.randn(E, D, generator=g, requires_grad=True)
    down = (torch.randn(E, r, D, generator=g) / D**0.5).requires_grad_()
    up = (torch.randn(E, D, r, generator=g) / r**0.5).requires_grad_()
    return x, y, router, down, up


def run(fn, x, y, router, down, up, k, experts=None, **kw):
    """Route, apply the adapters, and return output + gradients of a fixed projection."""
    logits = x @ router.T
    weights, chosen = route(logits, k)
    if experts is not None:  # forced routing: the weights still come from the router
        chosen = experts
        weights = F.softmax(logits.gather(1, experts), dim=-1)
    out = fn(y, weights, chosen, down, up, 0.5, **kw)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    *grads, d_weights = torch.autograd.grad((out * proj).sum(), [x, y, router, down, up, weights])
    # x and the router get their gradients through the softmax over the k chosen logits,
    # w_j (dw_j - sum_i w_i dw_i), which cancels: the result can be far smaller than its terms
    # (dw times the other factor of the matmul), so their tolerance is measured by those terms
    dw = d_weights.abs().max().item()
    scales = {"x": dw * router.abs().max().item(), "router": dw * x.abs().max().item()}
    return out, grads, scales


def assert_same(fast, ref):
    """Outputs and gradients agree to fp32 rounding."""
    (o1, g1, *_), (o2, g2, scales) = fast, ref
    # the longest sums: over the D columns (D_e y, the routing weights' gradient) and over the
    # N tokens (the router's and the adapters' weight gradients)
    reduction = max(o2.shape)
    assert_close(o1, o2, reduction=reduction, name="out")
    for name, a, b in zip(["x", "y", "router", "down", "up"], g1, g2, strict=True):
        assert_close(a, b, reduction=reduction, scale=scales.get(name), name=name)


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (16, 4)])
def test_sorted_dispatch_matches_loop(E, k):
    N, D, r = 37, 24, 6  # 37 tokens: not a multiple of the tile or of anything else
    case = make_case(N, D, E, r, k, seed=E * 10 + k)
    # tiles of 8 rows: experts span several tiles and most end in a partial one
    fast = run(lambda *a: adapter_experts_sorted(*a, block=8), *case, k)
    ref = run(adapter_experts_loop, *case, k)
    assert_same(fast, ref)


def test_default_tile_size_matches_loop():
    case = make_case(300, 32, 8, 8, 2, seed=3)
    assert_same(run(adapter_experts_sorted, *case, 2), run(adapter_experts_loop, *case, 2))


@pytest.mark.parametrize("chosen", [[3], [3, 5]])
def test_all_tokens_on_one_expert_and_empty_experts(chosen):
    # k=1: every token on expert 3; k=2: every token on experts 3 and 5; the rest get nothing
    N, D, E, r, k = 29, 16, 8, 4, len(chosen)
    case = make_case(N, D, E, r, k, seed=5)
    experts = torch.tensor([chosen] * N)
    fast = run(lambda *a: adapter_experts_sorted(*a, block=8), *case, k, experts=experts)
    ref = run(adapter_experts_loop, *case, k, experts=experts)
    assert_same(fast, ref)
    grads_down = fast[1][3]
    unused = [e for e in range(E) if e not in chosen]
    assert grads_down[unused].abs().max() == 0  # unused experts get no gradient
    assert (grads_down[chosen].flatten(1).abs().amax(1) > 0).all()  # every used expert gets one


def test_single_token():
    case = make_case(1, 16, 4, 4, 2, seed=6)
    assert_same(run(adapter_experts_sorted, *case, 2), run(adapter_experts_loop, *case, 2))


@pytest.mark.parametrize("N,k", [(1, 1), (1, 2), (3, 2), (2, 4)])
def test_few_pairs_as_when_decoding_match_loop(N, k):
    # fewer than 2E pairs: 1-row tiles, no more tiles than pairs; directly and through the dispatcher
    case = make_case(N, 16, 8, 4, k, seed=20 + N * k)
    ref = run(adapter_experts_loop, *case, k)
    assert_same(run(adapter_experts_sorted, *case, k), ref)
    assert_same(run(moe.adapter_experts, *case, k), ref)
    torch.manual_seed(5)
    dropped = run(adapter_experts_sorted, *case, k, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    assert_same(dropped, run(adapter_experts_loop, *case, k, dropout_p=0.5, training=True))


def test_dropout_uses_the_same_mask_in_both_paths():
    case = make_case(40, 16, 4, 4, 2, seed=7)
    torch.manual_seed(123)
    fast = run(adapter_experts_sorted, *case, 2, dropout_p=0.3, training=True)
    torch.manual_seed(123)
    ref = run(adapter_experts_loop, *case, 2, dropout_p=0.3, training=True)
    assert_same(fast, ref)
    torch.manual_seed(123)
    no_drop = run(adapter_experts_sorted, *case, 2)
    assert (fast[0] - no_drop[0]).abs().max() > 100 * tolerance(no_drop[0], reduction=40)  # dropout did something


def test_interleaved_calls_do_not_share_state():
    # two calls of different sizes, both forwards before either backward, backwards in the other
    # order, as two layers of a model do, must each equal the reference loop
    big, small = make_case(300, 32, 8, 8, 2, seed=8), make_case(45, 32, 4, 8, 2, seed=9)

    def start(fn, x, y, router, down, up, k):
        weights, chosen = route(x @ router.T, k)
        out = fn(y, weights, chosen, down, up, 0.5)
        return out, (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum()

    fast = [start(adapter_experts_sorted, *case, 2) for case in (big, small)]
    fast_grads = [torch.autograd.grad(loss, list(case)) for (_, loss), case in reversed(list(zip(fast, (big, small))))]
    for (out, _), grads, case in zip(fast, reversed(fast_grads), (big, small)):
        assert_same((out.detach(), grads), run(adapter_experts_loop, *case, 2))


def test_training_after_inference_mode():
    x, y, router, down, up = case = make_case(300, 32, 8, 8, 2, seed=3)
    with torch.inference_mode():
        adapter_experts_sorted(y, *route(x @ router.T, 2), down, up, 0.5)
    assert_same(run(adapter_experts_sorted, *case, 2), run(adapter_experts_loop, *case, 2))


def test_fast_path_on_the_meta_device():
    # plan.py counts what autograd saves by running the model on meta tensors
    with torch.device("meta"):
        y, down, up = torch.zeros(64, 32, requires_grad=True), torch.zeros(4, 8, 32), torch.zeros(4, 32, 8)
        out = adapter_experts_sorted(y, *route(torch.zeros(64, 4), 2), down, up, 0.5, 0.1, True)
    assert out.shape == (64, 32) and out.is_meta


def test_fast_path_under_torch_compile():
    # train.py and sample.py offer --compile (aot_eager runs the same tracing and autograd as
    # inductor, without a C++ compiler)
    case = make_case(37, 24, 4, 6, 2, seed=11)
    torch._dynamo.reset()
    compiled = torch.compile(adapter_experts_sorted, backend="aot_eager")
    assert_same(run(compiled, *case, 2), run(adapter_experts_loop, *case, 2))


def test_route_is_softmax_over_topk():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    w, e = route(logits, 2)
    assert e.tolist() == [[1, 2]]
    full = F.softmax(logits, -1)[0, [1, 2]]
    assert_close(w[0], full / full.sum())


# -----------------------------------------------------------------------------
# Load balancing


def test_aux_loss_hand_computed():
    # 3 tokens, 2 experts, top-1
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    experts = torch.tensor([[0], [0], [1]])
    aux, z, load = router_losses(logits, experts)
    p = F.softmax(logits.detach(), -1)
    f = torch.tensor([2 / 3, 1 / 3])
    P = p.mean(0)
    assert_close(aux, 2 * (f * P).sum(), reduction=3)  # means over 3 tokens
    assert load.tolist() == [2.0, 1.0]
    lse = torch.logsumexp(logits.detach(), -1)
    assert_close(z, lse.pow(2).mean(), reduction=3)
    # by hand: f = (2/3, 1/3); P_0 = (e^2/(e^2+1) + e/(e+1) + 1/(1+e^3)) / 3
    import math
    P0 = (math.exp(2) / (math.exp(2) + 1) + math.e / (math.e + 1) + 1 / (1 + math.exp(3))) / 3
    assert_close(aux.item(), 2 * (2 / 3 * P0 + 1 / 3 * (1 - P0)), dtype=torch.float32, reduction=3)


def test_aux_loss_is_one_at_perfect_balance():
    E = 4
    logits = torch.zeros(8, E)  # uniform probabilities
    experts = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert gets 1/4 of the assignments
    aux, _, load = router_losses(logits, experts)
    assert_close(aux, torch.tensor(1.0), reduction=8)  # means over 8 tokens
    assert load.tolist() == [4.0] * 4


def test_aux_loss_gives_the_router_a_gradient():
    # the official code's loss is the constant E/k with no gradient: these assertions fail for it
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    router = torch.randn(8, 16, requires_grad=True)
    logits = x @ router.T
    _, experts = route(logits, 2)
    aux, _, _ = router_losses(logits, experts)
    (g,) = torch.autograd.grad(aux, router)
    assert g.abs().max() > 1e-4
    skewed = logits.detach().clone()
    skewed[:, 0] += 10  # everything prefers expert 0
    aux_skewed, _, _ = router_losses(skewed, route(skewed, 2)[1])
    assert aux_skewed.item() > aux.item() + 0.5  # imbalance costs more
    assert abs(aux.item() - 8 / 2) > 1e-3  # not the buggy constant E/k


def test_padding_is_masked_out():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    experts = route(logits, 2)[1]
    valid = torch.tensor([True] * 6 + [False] * 4)
    masked = router_losses(logits, experts, valid)
    subset = router_losses(logits[:6], experts[:6])
    for a, b in zip(masked, subset, strict=True):
        assert_close(a, b, reduction=10)  # means over the tokens


def tiny_pesc(seed=0, **kw):
    torch.manual_seed(seed)
    dense = Transformer(ModelConfig.from_preset("tiny")).eval()
    cfg = PESCConfig(**{**dict(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0), **kw})
    return dense, cfg


def tiny_pesc_lora(targets=LoRAConfig.targets, dropout=0.1):
    """A tiny PESC model with LoRA of rank 4 on the target linears."""
    dense, cfg = tiny_pesc()
    return moe.add_lora(upcycle(dense, cfg), LoRAConfig(rank=4, targets=targets, dropout=dropout))


def test_model_loss_adds_weighted_aux_terms():
    dense, cfg = tiny_pesc(aux_loss_coef=0.5, z_loss_coef=0.1)
    model = upcycle(dense, cfg)
    idx = torch.randint(0, 512, (2, 12))
    out = model(idx, idx)
    logits, loss = out  # the tuple is (logits, objective)
    # each layer's router terms, recomputed from its router logits and routing
    per_layer, hooks = [], []
    for m in moe.pesc_layers(model):
        hooks.append(m.router.register_forward_hook(
            lambda mod, inp, lg: per_layer.append(router_losses(lg, route(lg, cfg.top_k)[1]))))
    with torch.no_grad():
        model(idx, idx)
    for h in hooks:
        h.remove()
    aux = torch.stack([t.aux_loss for t in per_layer]).mean()
    z = torch.stack([t.z_loss for t in per_layer]).mean()
    lm = F.cross_entropy(logits.view(-1, 512), idx.view(-1))
    assert_close(out.lm_loss, lm, reduction=512)  # the log-sum-exp over the vocab
    assert_close(loss, lm + 0.5 * aux + 0.1 * z, reduction=512)
    assert_close(out.aux_loss, aux, reduction=2 * 12)  # means over the tokens
    assert_close(out.z_loss, z, reduction=2 * 12)
    assert out.expert_load.shape == (2, 4)
    assert out.expert_load.sum(1).tolist() == [2 * 12 * 2] * 2  # per layer: tokens x k assignments
    assert model(idx)[1] is None and model(idx).expert_load.shape == (2, 4)  # no targets: no loss
    dense_out = Transformer(ModelConfig.from_preset("tiny"))(idx, idx)
    assert dense_out.aux_loss is None and torch.equal(dense_out.loss, dense_out.lm_loss)
    loss.backward()
    assert model.layers[0].feed_forward.router.weight.grad.abs().max() > 0


# -----------------------------------------------------------------------------
# Upcycling and LoRA


def test_upcycled_logits_equal_dense_exactly():
    dense, cfg = tiny_pesc()
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = dense(idx)[0]
        model = upcycle(dense, cfg)
        assert model.config.moe == cfg
        out = model(idx)[0]
    assert torch.equal(out, ref)


def test_trainable_set():
    dense, cfg = tiny_pesc()
    model = upcycle(dense, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.feed_forward.{n}" for i in range(2)
                for n in ("router.weight", "adapter_down", "adapter_up")}
    assert trainable == expected
    assert moe.trainable_report(model).startswith("trainable ")

    model = tiny_pesc_lora(targets=("q", "v", "down"))
    assert model.config.lora == LoRAConfig(rank=4, targets=("q", "v", "down"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"layers.{i}.{m}.{w}" for i in range(2)
            for m in ("attention.wq", "attention.wv", "feed_forward.w2") for w in ("lora_a", "lora_b")}
    assert trainable == expected | lora


def test_set_trainable_per_mode():
    model = moe.set_trainable(tiny_pesc_lora(targets=("q",)), "pesc")
    names = {n for n, _ in model.named_parameters()}
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    pesc = trainable()
    assert pesc == {n for n in names if n.endswith(("router.weight", "adapter_down", "adapter_up", "lora_a", "lora_b"))}
    assert trainable() == pesc and moe.set_trainable(model, "full") is model and trainable() == names
    moe.set_trainable(model, "pesc")
    assert trainable() == pesc

    dense, _ = tiny_pesc()
    with pytest.raises(ValueError, match="PESC model"):
        moe.set_trainable(dense, "pesc")
    with pytest.raises(ValueError, match="add_lora"):
        moe.set_trainable(dense, "lora")
    with pytest.raises(ValueError, match="unknown training mode"):
        moe.set_trainable(dense, "adapters")
    moe.set_trainable(moe.add_lora(dense, LoRAConfig(rank=4, targets=("v",), dropout=0.0)), "lora")
    assert {n for n, p in dense.named_parameters() if p.requires_grad} == \
        {f"layers.{i}.attention.wv.lora_{w}" for i in range(2) for w in "ab"}


def test_upcycle_init():
    dense, cfg = tiny_pesc(num_experts=8, adapter_dim=16)
    model = upcycle(dense, cfg)
    ff = model.layers[0].feed_forward
    assert ff.adapter_up.abs().max() == 0
    bound = 1 / 64**0.5
    assert ff.adapter_down.abs().max() <= bound and ff.adapter_down.abs().max() > 0.9 * bound
    assert ff.router.weight.abs().max() <= bound
    assert ff.adapter_down.shape == (8, 16, 64) and ff.adapter_up.shape == (8, 64, 16)


def test_lora_merge_preserves_logits():
    model = tiny_pesc_lora(dropout=0.0).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moe.LoRALinear):
                m.lora_b.normal_(0, 0.05)  # make the LoRA update count
            if isinstance(m, moe.PESCFeedForward):
                m.adapter_up.normal_(0, 0.05)
        idx = torch.randint(0, 512, (2, 16))
        before = model(idx)[0]
        moe.merge_lora(model)
        after = model(idx)[0]
    assert not any(isinstance(m, moe.LoRALinear) for m in model.modules())
    assert model.config.lora is None
    c = model.config  # a whole model: the longest dot (the FFN's) once per layer
    assert_close(after, before, reduction=c.ffn_dim * c.n_layers)


def test_pesc_checkpoint_roundtrip(tmp_path):
    dense, cfg = tiny_pesc()
    model = upcycle(dense, cfg)
    with torch.no_grad():
        for m in moe.pesc_layers(model):
            m.adapter_up.normal_()
    model.save_pretrained(tmp_path / "pesc")
    loaded = Transformer.from_pretrained(tmp_path / "pesc").eval()
    assert loaded.config.moe == cfg
    idx = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], loaded(idx)[0])


def test_a_checkpoint_written_before_lora_had_its_config_loads(tmp_path):
    # LoRA's settings used to live in the PESC ones ("moe": {..., "lora_rank": 4, ...}); such a
    # checkpoint loads with LoRA described by config.lora, and one with lora_rank 0 has none
    import json

    model = tiny_pesc_lora(targets=("q", "down"), dropout=0.0).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moe.LoRALinear):
                m.lora_b.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    lora = config.pop("lora")
    config["moe"].update({f"lora_{k}": v for k, v in lora.items()})
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path / "new").eval()
    assert loaded.config.lora == LoRAConfig(rank=4, targets=("q", "down"), dropout=0.0)
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    config["moe"]["lora_rank"] = 0
    assert ModelConfig.from_dict(config).lora is None
