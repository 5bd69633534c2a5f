import pytest

from masep.config import ConfigError, load_config
from masep.parallel.layout import make_layout

# The paper's 16-GPU layouts and their 8-GPU scalings (tp 8; pp 2 x dp 4; tp_pp 4 x 2; ep_dp 8;
# ma_sep 4 attention + 4 MoE).
LAYOUTS = [
    (16, ["parallel.strategy=tp", "parallel.tp=8"], dict(tp=8, dp=2, pp=1)),
    (16, ["parallel.strategy=pp", "parallel.pp=2"], dict(tp=1, dp=8, pp=2)),
    (16, ["parallel.strategy=tp_pp", "parallel.tp=8", "parallel.pp=2"], dict(tp=8, dp=1, pp=2)),
    (16, ["parallel.strategy=ep_dp"], dict(ep=16, dp=16)),
    (16, ["parallel.strategy=ma_sep", "parallel.attn_tp=4", "parallel.attn_replicas=2", "parallel.moe_ranks=8"],
     dict(attn_tp=4, attn_replicas=2, moe_ranks=8, dp=2)),
    (8, ["parallel.strategy=tp", "parallel.tp=8"], dict(tp=8, dp=1)),
    (8, ["parallel.strategy=pp", "parallel.pp=2"], dict(pp=2, dp=4)),
    (8, ["parallel.strategy=tp_pp", "parallel.tp=4", "parallel.pp=2"], dict(tp=4, pp=2, dp=1)),
    (8, ["parallel.strategy=ep_dp"], dict(ep=8, dp=8)),
    (8, ["parallel.strategy=ma_sep", "parallel.attn_tp=4", "parallel.attn_replicas=1", "parallel.moe_ranks=4"],
     dict(attn_tp=4, moe_ranks=4, dp=1)),
]


@pytest.mark.parametrize("world,sets,expected", LAYOUTS)
def test_paper_layouts_fit_the_paper_model(world, sets, expected):
    layout = make_layout(load_config("paper", sets + [f"parallel.world_size={world}"]))
    for key, value in expected.items():
        assert getattr(layout, key) == value, key
    # every rank has exactly one role and the roles fill the world
    coords = [layout.coords(r) for r in range(world)]
    if layout.strategy == "ma_sep":
        assert sum(c["role"] == "attention" for c in coords) == layout.attn_tp * layout.attn_replicas
        assert sum(c["role"] == "moe" for c in coords) == layout.moe_ranks
    else:
        assert len({(c["dp"], c["stage"], c["tp"]) for c in coords}) == world
        assert all(layout.rank_of(c["dp"], c["stage"], c["tp"]) == r for r, c in enumerate(coords))
    # the global batch (1024 sequences of 8) is shared evenly by the replicas
    assert layout.microbatches * layout.dp == 1024 // 8


@pytest.mark.parametrize("sets,message", [
    (["parallel.strategy=tp", "parallel.tp=3", "parallel.world_size=6"], "parallel.tp: tensor-parallel degree 3 does not divide 32 heads"),
    (["parallel.strategy=tp", "parallel.tp=8", "parallel.world_size=12"], "parallel.world_size: world size 12 is not a multiple of tp 8"),
    (["parallel.strategy=pp", "parallel.pp=3", "parallel.world_size=3"], "parallel.pp: 3 pipeline stages do not divide 4 layers"),
    (["parallel.strategy=ep_dp", "parallel.world_size=12"], "parallel.world_size: world size 12 does not divide 16 experts"),
    (["parallel.strategy=ma_sep", "parallel.attn_tp=4", "parallel.attn_replicas=2", "parallel.moe_ranks=8",
      "parallel.world_size=12"], "parallel.world_size: attention group attn_tp 4 x attn_replicas 2 = 8 plus moe_ranks 8 = 16, not world size 12"),
    (["parallel.strategy=ma_sep", "parallel.attn_tp=1", "parallel.attn_replicas=1", "parallel.moe_ranks=3",
      "parallel.world_size=4"], "parallel.moe_ranks: 3 MoE ranks do not divide 16 experts"),
    (["parallel.strategy=single", "parallel.world_size=2"], "parallel.world_size: strategy single runs on 1 rank"),
])
def test_impossible_layouts_fail_naming_the_numbers(sets, message):
    with pytest.raises(ConfigError) as err:
        make_layout(load_config("paper", sets))
    assert str(err.value).startswith(message)


def test_batch_that_replicas_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="train.global_batch: 3 micro-batches"):
        make_layout(load_config("tiny", ["train.global_batch=6", "parallel.strategy=ep_dp", "parallel.world_size=4"]))


def test_masep_layout_prints_one_json_document(capsys):
    import json

    from masep.cli import main

    assert main(["layout", "--config", "tiny", "--set", "parallel.strategy=tp", "parallel.world_size=4"]) == 0
    layout = json.loads(capsys.readouterr().out)
    assert layout["tp"] == 2 and [r["rank"] for r in layout["ranks"]] == [0, 1, 2, 3]
    assert layout["ranks"][1] == {"rank": 1, "role": "model", "dp": 0, "stage": 0, "tp": 1}
