"""Config parsing: numbers in every notation people write, from YAML and from --set."""
import pytest

from masep.config import ConfigError, load_config, parse_number


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("3.0e-3", 3e-3), (".5", 0.5), ("-2.5e+1", -25.0),
    ("1_000", 1000), ("7", 7), ("+7", 7), ("1.", 1.0),
])
def test_number_notations_parse(text, value):
    got = parse_number(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["", "e3", "1e", "abc", "1.2.3", "nan", "inf", "0x10"])
def test_non_numbers_are_not_numbers(text):
    assert parse_number(text) is None


def test_set_accepts_scientific_notation():
    cfg = load_config(["tiny"], ["train.lr=1e-3", "train.steps=1e3", "model.capacity_factor=1.25e0"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 1000 and type(cfg.train.steps) is int
    assert cfg.model.capacity_factor == 1.25


def test_yaml_accepts_scientific_notation(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\ntrain:\n  lr: 1e-3\n  min_lr_ratio: .05\n")
    cfg = load_config([path])
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr_ratio == 0.05


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.steps=1.5e0", "train.steps: expected an integer, got 1.5"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5"),
])
def test_what_is_not_a_number_of_the_right_kind_is_refused(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.") + "$"):
        load_config(["tiny"], [override])
