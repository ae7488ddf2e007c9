"""SparseConfig: every field validated at construction, per method; the JSON round trip."""
import pytest
import torch

from fastft import SparseConfig
from fastft.config import CONFIG_CLASSES, WrongType, config_from_dict
from fastft.config.sparse import METHODS, OPTIONS


def _valid(method, **options):
    extra = {"lt-sft": {"phase1": {}}, "sct": {"calib": {"input_ids": torch.zeros(1, 2, dtype=torch.long)}}}
    return SparseConfig(method=method, **{**extra.get(method, {}), **options})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_through_its_dict(method):
    config = _valid(method, density=0.01, targets=["q_proj"], layers=[1, 0])
    data = config.to_dict()
    assert data["method"] == method and "phase1" not in data and "calib" not in data
    assert CONFIG_CLASSES[method] is SparseConfig
    restored = config_from_dict({**data, "saved_support": True})
    assert restored.method == method and restored.layers == (0, 1) and restored.saved_support


@pytest.mark.parametrize("field, value", [
    ("method", "lora"), ("method", None), ("density", 0), ("density", 1.5), ("density", "0.1"), ("density", float("nan")),
    ("targets", []), ("targets", "("), ("layers", [-1]), ("seed", 1.5), ("saved_support", 1),
])
def test_bad_common_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SparseConfig(**{field: value})


@pytest.mark.parametrize("method, field, value", [
    ("spiel", "regrow_every", 0), ("spiel", "prune_fraction", 0.0), ("spiel", "prune_fraction", 1.1),
    ("spiel", "candidate_factor", 0.5), ("diff-pruning", "l0_weight", 0.0), ("diff-pruning", "temperature", 0.0),
    ("diff-pruning", "temperature", 2.0), ("diff-pruning", "final_density", 0.0), ("diff-pruning", "fix_at_step", 0),
    ("diff-pruning", "gate_init", float("inf")), ("gmt", "keep_fraction", 0.0), ("mft", "score_init", 0.0), ("sara", "nuclear_weight", -1.0),
    ("gmt", "support", "largest"), ("sct", "calib", 3), ("lt-sft", "phase1", [1, 2]),
])
def test_bad_method_options_name_the_field(method, field, value):
    with pytest.raises(ValueError, match=field):
        _valid(method, **{field: value})


@pytest.mark.parametrize("field", sorted(OPTIONS))
def test_an_option_of_another_method_is_refused(field):
    user = OPTIONS[field][0]
    other = next(m for m in ("sara", "spiel") if m not in OPTIONS[field])
    value = {"support": "smallest", "phase1": {}, "calib": {}, "fix_at_step": 5, "nuclear_weight": 0.1}.get(field)
    if value is None:
        value = _valid(user).__getattribute__(field)
        value = value * 0.5 if isinstance(value, float) else value + 1
    _valid(user, **{field: value})  # accepted by its own method
    with pytest.raises(ValueError, match=field):
        SparseConfig(method=other, **{field: value})


def test_required_inputs_and_defaults():
    with pytest.raises(ValueError, match="phase1"):
        SparseConfig(method="lt-sft")
    with pytest.raises(ValueError, match="calib"):
        SparseConfig(method="sct")
    assert SparseConfig(method="lt-sft", saved_support=True).phase1 is None  # restored from a save
    assert SparseConfig(method="mft").support == "magnitude"
    assert SparseConfig(method="gmt").support == "random" and SparseConfig().support is None
    assert SparseConfig().needs_schedule and not SparseConfig(method="diff-pruning").needs_schedule
    assert SparseConfig(method="diff-pruning", fix_at_step=10).needs_schedule
    with pytest.raises(TypeError, match="no argument"):
        SparseConfig(rank=4)
    assert isinstance(WrongType("x"), ValueError)
