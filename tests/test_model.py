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
    assert 13.5e9 < built < 13.7e9  # the seed's dimensions give ~13.6 B
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
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(key + ":")
    assert "\n" not in str(err.value)
