"""The Hub reader (`data.source=hub`, what paper-scale runs use) against a local stand-in of
the Hub's file layout: `datasets` loads the same `data_files` pattern from a local folder."""
from __future__ import annotations

import pytest

from masep.data import c4
from masep.data import tokenize as tok
from masep.data.c4 import load_c4_shard
from masep.data.shards import shard_dir
from helpers import c4_file, local_cfg, make_docs, write_gz


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_reader_reads_what_the_local_reader_reads(tmp_path, monkeypatch, streaming):
    docs = make_docs(60)
    docs[5]["text"] = ""  # skipped and counted, as on the Hub
    write_gz(c4_file(tmp_path), docs)
    local = local_cfg(tmp_path, "data.max_docs=50")
    hub = local_cfg(tmp_path, "data.source=hub", "data.max_docs=50", f"data.hub_streaming={str(streaming).lower()}")
    # tmp_path/c4 holds en/c4-train.00000-of-01024.json.gz, the Hub repository's layout
    monkeypatch.setattr(c4, "HUB_DATASET", str(tmp_path / "c4"))

    hub_shard, local_shard = load_c4_shard(hub.data, 0, tmp_path / "cache"), load_c4_shard(local.data, 0)
    # text and url decide tokens and split; the `json` builder parses timestamps into its own format
    assert [(d["text"], d["url"]) for d in hub_shard] == [(d["text"], d["url"]) for d in local_shard]
    assert hub_shard.docs == 50 and hub_shard.skipped == local_shard.skipped == {"empty": 1}

    assert tok.tokenize_shard(hub.data, 0)[0] == "built"
    assert tok.tokenize_shard(local.data, 0)[0] == "built"
    for name in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy"):
        assert (shard_dir(hub.data, 0) / name).read_bytes() == (shard_dir(local.data, 0) / name).read_bytes()


def test_an_unreadable_hub_shard_fails_in_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "c4" / "en").mkdir(parents=True)
    (tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz").write_bytes(b"not gzip at all")
    monkeypatch.setattr(c4, "HUB_DATASET", str(tmp_path / "c4"))
    hub = local_cfg(tmp_path, "data.source=hub")
    with pytest.raises(c4.C4ReadError, match=r"c4-train\.00000-of-01024\.json\.gz: cannot read from the Hub") as err:
        list(load_c4_shard(hub.data, 0, tmp_path / "cache"))
    assert "\n" not in str(err.value)
