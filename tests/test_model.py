import math

import pytest
import torch
import torch.nn.functional as F

from masep.config import ConfigError, load_config
from masep.model import (Experts, MoETransformer, analytic_parameter_count, build_model, expert_capacity,
                         route)


def tiny(**over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return load_config("tiny", sets).model


def test_paper_parameter_count_matches_analytic_on_meta_device():
    cfg = load_config("paper").model
    with torch.device("meta"):
        model = MoETransformer(cfg)
    built = sum(p.numel() for p in model.parameters())
    counts = analytic_parameter_count(cfg)
    assert built == counts["total"]
    assert 13.5e9 < built < 13.7e9  # the paper's dimensions give ~13.6 B
    assert counts["experts"] == 4 * 16 * 3 * 4096 * 16384
    # active per token besides embedding and head: attention + routers + 2 of 16 experts
    besides = counts["active_matmul"] - counts["head"]
    assert 1.8e9 < besides < 2.0e9
    assert cfg.padded_vocab == 50304 and cfg.vocab_size == 50257


def test_load_balancing_and_z_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0],
                           [0.0, 3.0, 0.0, 0.0],
                           [1.0, 0.5, 0.0, 0.0]])
    r = route(logits, top_k=1, capacity_factor=None)
    p = logits.softmax(-1)
    # top-1 choices: experts 0, 1, 0
    f = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])
    expected_lb = 4 * float((f * p.mean(0)).sum())
    expected_z = float(torch.logsumexp(logits, -1).pow(2).mean())
    assert r.lb_loss.item() == pytest.approx(expected_lb, rel=1e-6)
    assert r.z_loss.item() == pytest.approx(expected_z, rel=1e-6)
    assert r.tokens_per_expert.tolist() == [2, 1, 0, 0]
    # z-loss of the first row alone: (2 + log(1 + 3 e^-2))^2
    z0 = (2 + math.log(1 + 3 * math.exp(-2))) ** 2
    assert route(logits[:1], 1, None).z_loss.item() == pytest.approx(z0, rel=1e-6)


def test_uniform_router_gives_lb_loss_one():
    r = route(torch.zeros(64, 8), top_k=2, capacity_factor=None)
    assert r.lb_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_capacity_drops_second_choices_first():
    # 4 tokens all choose expert 0 first and expert 1 second; 4 experts, top-2, factor 1.0:
    # capacity = ceil(1.0 * 4 * 2 / 4) = 2 per expert.
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 4)
    assert expert_capacity(4, 4, 2, 1.0) == 2
    r = route(logits, top_k=2, capacity_factor=1.0)
    assert r.keep.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    assert r.dropped.item() == 4
    assert r.tokens_per_expert.tolist() == [2, 2, 0, 0]
    dropless = route(logits, top_k=2, capacity_factor=None)
    assert dropless.dropped.item() == 0 and dropless.tokens_per_expert.tolist() == [4, 4, 0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_capacity_shortcut_agrees_with_the_queue(seed):
    """Where capacity >= tokens the queue computation is skipped; on random routings with
    capacity just at and just under the token count the queue gives the same answer."""
    g = torch.Generator().manual_seed(seed)
    N, E, k = 6, 4, 2
    logits = torch.randn(N, E, generator=g) * 3
    at = route(logits, k, capacity_factor=N * E / (N * k))  # capacity == N: the shortcut
    assert expert_capacity(N, E, k, N * E / (N * k)) == N
    assert at.keep.all() and at.dropped.item() == 0
    assert at.tokens_per_expert.tolist() == torch.bincount(at.expert.reshape(-1), minlength=E).tolist()
    under = route(logits, k, capacity_factor=(N - 1) * E / (N * k))  # capacity N - 1: the queue
    counts = torch.bincount(under.expert.reshape(-1), minlength=E)
    assert under.dropped.item() == int((counts - (N - 1)).clamp(min=0).sum())


def test_top_k_weights_are_renormalised_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    r = route(logits, top_k=2, capacity_factor=None)
    p = logits.softmax(-1)[0]
    assert r.expert[0].tolist() == [2, 1]
    assert r.weight[0].tolist() == pytest.approx([float(p[2] / (p[2] + p[1])), float(p[1] / (p[2] + p[1]))])


def test_experts_loop_matches_dense_swiglu_per_expert():
    torch.manual_seed(0)
    ex = Experts(3, 8, 16, "swiglu")
    torch.nn.init.normal_(ex.w_up)
    torch.nn.init.normal_(ex.w_down)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8)
    y = ex(x, counts)
    for rows, e in ((slice(0, 2), 0), (slice(2, 5), 2)):
        gate, up = (x[rows] @ ex.w_up[e]).chunk(2, -1)
        assert torch.allclose(y[rows], (F.silu(gate) * up) @ ex.w_down[e], atol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_mm_matches_expert_loop():
    torch.manual_seed(0)
    ex = Experts(4, 16, 32, "swiglu")
    torch.nn.init.normal_(ex.w_up, std=0.1)
    torch.nn.init.normal_(ex.w_down, std=0.1)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16)
    offs = counts.cumsum(0).to(torch.int32)
    try:
        h = torch._grouped_mm(x, ex.w_up, offs=offs)
    except RuntimeError as e:  # the CPU build may not implement it
        pytest.skip(f"_grouped_mm unavailable here: {e}")
    y = torch._grouped_mm(ex._act(h), ex.w_down, offs=offs)
    assert torch.allclose(y, ex(x, counts), atol=1e-5)


def test_kv_cache_decoding_equals_recomputation():
    cfg = tiny(**{"model.expert_dropout": 0.0, "model.capacity_factor": "null"})
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(ids)
        caches = model.new_caches(2, 20)
        first, _ = model(ids[:, :12], 0, caches)
        steps = [model(ids[:, t:t + 1], t, caches)[0] for t in range(12, 20)]
        chunk_caches = model.new_caches(2, 20)
        model(ids[:, :8], 0, chunk_caches)
        chunked, _ = model(ids[:, 8:20], 8, chunk_caches)  # a multi-token step after a prefix
    cached = torch.cat([first] + steps, dim=1)
    assert torch.allclose(cached[..., :cfg.vocab_size], full[..., :cfg.vocab_size], atol=1e-4)
    assert torch.allclose(chunked[..., :cfg.vocab_size], full[:, 8:, :cfg.vocab_size], atol=1e-4)


@pytest.mark.parametrize("capacity", ["null", "0.5"])
def test_static_decode_step_equals_cached_forward(capacity):
    """The fixed-shape decode step (what the CUDA graph replays) gives the logits of the eager
    cached forward, including capacity drops among the batch's tokens (capacity 0.5: one
    assignment per expert among 3 tokens x top-2)."""
    cfg = tiny(**{"model.expert_dropout": 0.0, "model.capacity_factor": capacity})
    model = build_model(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    dropped = 0
    with torch.no_grad():
        eager, static = model.new_caches(3, 16), model.new_caches(3, 16)
        model(ids[:, :10], 0, eager)
        model(ids[:, :10], 0, static)
        for t in range(10, 16):
            want, routings = model(ids[:, t:t + 1], t, eager, last_only=True)
            got = model.decode_logits(ids[:, t:t + 1], torch.tensor([t]), static)
            dropped += sum(int(r.dropped) for r in routings)
            assert torch.allclose(got[:, :cfg.vocab_size], want[:, -1, :cfg.vocab_size], atol=1e-5, rtol=1e-5)
        for e, s in zip(eager, static):
            assert torch.allclose(e.k, s.k, atol=1e-6) and torch.allclose(e.v, s.v, atol=1e-6)
    assert (dropped > 0) == (capacity == "0.5")  # the drop path was exercised where it exists


def test_cast_once_weights_give_autocast_gradients():
    """Under bf16 autocast each weight is cast once per version and its gradient lands in the
    fp32 `.grad`: the same loss and (to bf16 rounding) the same gradients as plain autocast
    casts, over two micro-batches of accumulation."""
    from masep.model import lm_loss_sum
    from masep.model import moe_transformer as mt

    cfg = tiny(**{"model.expert_dropout": 0.0, "model.capacity_factor": "null"})
    ids = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(3))

    def grads(cast_once: bool):
        model = build_model(cfg, seed=4)
        original = mt.compute_weight
        if not cast_once:  # reference: a fresh cast per use, gradients through the cast
            mt.compute_weight = lambda p, dtype=None: p.to(dtype or torch.get_autocast_dtype("cpu")) \
                if torch.is_autocast_enabled("cpu") or dtype is not None else p
        try:
            losses = []
            for mb in (ids[:2], ids[2:]):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits, _ = model(mb[:, :-1])
                loss = lm_loss_sum(logits, mb[:, 1:], torch.ones(2, 16)) / 64
                loss.backward()
                losses.append(float(loss.detach()))
        finally:
            mt.compute_weight = original
        return losses, {n: p.grad for n, p in model.named_parameters()}

    ref_loss, ref = grads(False)
    got_loss, got = grads(True)
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    assert all(g.dtype == torch.float32 for g in got.values())
    for name, g in ref.items():
        assert got[name] is not None, name
        assert (got[name] - g).norm() <= 1e-2 * g.norm() + 1e-8, name


def test_cast_once_copy_follows_optimizer_updates():
    """The cached bf16 copy is remade after an in-place update of the weight."""
    from masep.model import compute_weight

    w = torch.nn.Parameter(torch.randn(8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = compute_weight(w)
        assert compute_weight(w) is a  # same version: reused
        with torch.no_grad():
            w.add_(1.0)
        b = compute_weight(w)
    assert b is not a and torch.equal(b, (w.detach()).to(torch.bfloat16))


def test_padded_vocabulary_is_never_predicted():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape[-1] == 50304
    assert torch.isinf(logits[..., cfg.vocab_size:]).all()


def test_same_seed_same_weights_and_different_seed_differs():
    cfg = tiny()
    a, b, c = build_model(cfg, 3), build_model(cfg, 3), build_model(cfg, 4)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(pa, pc), n


@pytest.mark.parametrize("override,key", [
    ("model.heads=5", "model.heads"),
    ("model.top_k=17", "model.top_k"),
    ("model.hidn=3", "model.hidn"),
    ("train.steps=many", "train.steps"),
    ("train.micro_batch=3", "train.micro_batch"),
    ("model.capacity_factor=-1", "model.capacity_factor"),
    ("infer.compile=fast", "infer.compile"),
    ("infer.compile=off", "infer.compile"),  # YAML reads off as false: values are eager/default/max-autotune
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(key + ":")
    assert "\n" not in str(err.value)


def test_single_rank_generate_equals_eager_greedy_loop():
    """`SingleRank.generate` (the fixed-shape step behind `StaticDecoder`) decodes the tokens of
    the plain cached-forward greedy loop, capacity drops among the batch included."""
    from masep.parallel.layout import make_layout
    from masep.parallel.single import SingleRank

    cfg = load_config("tiny", ["model.expert_dropout=0.0", "model.capacity_factor=0.5"])
    model = build_model(cfg.model, seed=5)
    prompt = torch.randint(0, cfg.model.vocab_size, (3, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        caches = model.new_caches(3, 20)
        logits, _ = model(prompt, 0, caches, last_only=True)
        ids, want = logits[:, -1].argmax(-1), []
        for t in range(12, 20):
            want.append(ids)
            logits, _ = model(ids[:, None], t, caches, last_only=True)
            ids = logits[:, -1].argmax(-1)
    gen = SingleRank(cfg, make_layout(cfg), 0, "cpu", model).generate(prompt, 8)
    assert torch.equal(gen.tokens, torch.stack(want, 1))
    assert len(gen.token_s) == 7 and all(t > 0 for t in gen.token_s)


def test_padding_is_routed_nowhere_and_counts_nowhere():
    """Masked positions take no capacity and add nothing to the aux losses or counts: routing
    them with the others equals routing the valid tokens alone."""
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    valid = torch.rand(32, generator=torch.Generator().manual_seed(4)) > 0.3
    got, want = route(logits, 2, 1.0, valid), route(logits[valid], 2, 1.0)
    assert want.dropped > 0  # capacity binds, so the padding's absence matters
    assert torch.equal(got.keep[valid], want.keep) and not got.keep[~valid].any()
    assert torch.equal(got.tokens_per_expert, want.tokens_per_expert) and got.dropped == want.dropped
    assert got.lb_loss == want.lb_loss and got.z_loss == want.z_loss
    assert torch.equal(got.weight[valid], want.weight) and not got.weight[~valid].any()
