from __future__ import annotations

import pytest

import toca_fx
from toca_fx import ToCaConfig


def test_round_trip_and_frozen():
    cfg = ToCaConfig(interval=4, fresh_ratio=0.2, score="v-norm", self_attention="partial")
    assert ToCaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception):
        cfg.interval = 5


@pytest.mark.parametrize("name,expect", [
    ("toca-dit-ddim50", dict(interval=3, fresh_ratio=0.07, ratio_schedule="toca-ddim50")),
    ("toca-dit-ddpm250", dict(interval=4, fresh_ratio=0.07, ratio_schedule="toca-ddpm250")),
    ("toca-pixart", dict(interval=3, fresh_ratio=0.30, ratio_schedule="toca-pixart")),
    ("fora", dict(fresh_ratio=0.0)),
])
def test_presets(name, expect):
    cfg = ToCaConfig.preset(name)
    for k, v in expect.items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize("field,value,allowed", [
    ("fresh_ratio", 1.5, "[0, 1]"), ("interval", 0, ">= 1"), ("ratio_schedule", "linear", "toca-ddim50"),
    ("self_attention", "skip", "reuse"), ("score", "entropy", "v-norm"), ("spatial_grid", 0, ">= 1"),
])
def test_bad_values_name_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        ToCaConfig(**{field: value})
    assert f"ToCaConfig.{field}" in str(info.value) and allowed in str(info.value)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown preset"):
        ToCaConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown ToCaConfig fields"):
        ToCaConfig.from_dict({"interval": 2, "ratio": 0.3})


def test_transform_validates_overrides():
    import torch.nn as nn
    with pytest.raises(ValueError, match="fresh_ratio"):
        toca_fx.transform(nn.Linear(2, 2), fresh_ratio=1.5)
