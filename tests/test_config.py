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


# -- the forecasting / scheduling fields ---------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("warmup", 0), ("warmup", -1), ("warmup", True), ("warmup", 2.0), ("warmup", "2"),
    ("forecast_order", -1), ("forecast_order", 9), ("forecast_order", True), ("forecast_order", 1.0),
    ("forecast_order", "2"),
    ("forecast_variable", "sigma"), ("forecast_variable", None),
    ("cycle", "fora"), ("cycle", None),
    ("fresh_align", "middle"), ("fresh_align", None),
    ("adaptive_threshold", 0), ("adaptive_threshold", -0.1), ("adaptive_threshold", float("nan")),
    ("adaptive_threshold", float("inf")), ("adaptive_threshold", float("-inf")), ("adaptive_threshold", True),
    ("adaptive_threshold", "0.1"),
    ("fresh_steps", (0, -1)), ("fresh_steps", (0, 2.0)), ("fresh_steps", (True,)), ("fresh_steps", "0,3"),
    ("fresh_steps", 3), ("fresh_steps", [0, None]),
])
def test_new_fields_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        ToCaConfig(**{field: value})
    shown = tuple(value) if isinstance(value, list) else value      # a list of fresh steps is made a tuple first
    assert str(info.value).startswith(f"ToCaConfig.{field}={shown!r} is invalid: allowed ")


@pytest.mark.parametrize("field,values", [
    ("warmup", (1, 2, 50)),
    ("forecast_order", (None, 0, 1, 8)),
    ("forecast_variable", ("step", "timestep")),
    ("cycle", ("partial", "duca")),
    ("fresh_align", ("start", "end")),
    ("adaptive_threshold", (None, 0.05, 1, 1e9)),
    ("fresh_steps", (None, (), (0,), (0, 3, 3, 49))),
])
def test_new_fields_accept_allowed_values(field, values):
    for v in values:
        assert getattr(ToCaConfig(**{field: v}), field) == v


def test_new_field_defaults():
    cfg = ToCaConfig()
    assert (cfg.warmup, cfg.forecast_order, cfg.forecast_variable, cfg.fresh_steps, cfg.fresh_align, cfg.cycle,
            cfg.adaptive_threshold) == (1, None, "step", None, "start", "partial", None)


def test_fresh_steps_list_is_stored_as_a_tuple():
    cfg = ToCaConfig(fresh_steps=[0, 4, 8])
    assert cfg.fresh_steps == (0, 4, 8) and type(cfg.fresh_steps) is tuple
    assert cfg == ToCaConfig(fresh_steps=(0, 4, 8)) and hash(cfg) == hash(ToCaConfig(fresh_steps=(0, 4, 8)))


def test_forecast_order_refused_with_partial_kv():
    with pytest.raises(ValueError, match=r"ToCaConfig.forecast_order=1 is invalid: allowed None with "
                                         r"self_attention='partial-kv'"):
        ToCaConfig(forecast_order=1, self_attention="partial-kv")
    with pytest.raises(ValueError, match="ToCaConfig.forecast_order=0"):
        ToCaConfig(forecast_order=0, self_attention="partial-kv")
    assert ToCaConfig(forecast_order=2, self_attention="partial").forecast_order == 2


@pytest.mark.parametrize("order", [None, 0])
def test_forecast_error_score_needs_forecast_order(order):
    with pytest.raises(ValueError, match=r"ToCaConfig.score='forecast-error' is invalid: allowed 'forecast-error' "
                                         r"only with forecast_order >= 1"):
        ToCaConfig(score="forecast-error", forecast_order=order)


def test_forecast_error_score_with_forecast_order():
    for order in (1, 8):
        assert ToCaConfig(score="forecast-error", forecast_order=order).score == "forecast-error"


def test_round_trip_with_the_new_fields():
    import json
    cfg = ToCaConfig(interval=4, fresh_ratio=0.2, warmup=2, forecast_order=2, forecast_variable="timestep",
                     fresh_steps=(0, 1, 5, 9), fresh_align="end", cycle="duca", adaptive_threshold=0.3,
                     score="forecast-error")
    d = cfg.to_dict()
    assert {k: d[k] for k in ("warmup", "forecast_order", "forecast_variable", "fresh_steps", "fresh_align", "cycle",
                              "adaptive_threshold")} == dict(warmup=2, forecast_order=2, forecast_variable="timestep",
                                                             fresh_steps=(0, 1, 5, 9), fresh_align="end",
                                                             cycle="duca", adaptive_threshold=0.3)
    assert ToCaConfig.from_dict(d) == cfg
    back = ToCaConfig.from_dict(json.loads(json.dumps(d)))      # JSON turns the tuple into a list
    assert back == cfg and back.fresh_steps == (0, 1, 5, 9)
    assert cfg.replace(cycle="partial").cycle == "partial" and cfg.replace(cycle="partial").warmup == 2


def test_allowed_values_come_from_the_registries():
    from toca_fx import config
    from toca_fx.passes.scores import SCORES as score_registry
    from toca_fx.runtime.schedule import SCHEDULES as schedule_registry
    assert config.SCORES == tuple(score_registry) == ("toca", "v-norm", "k-norm", "random", "staleness",
                                                      "forecast-error")
    assert config.RATIO_SCHEDULES == tuple(schedule_registry) == ("constant", "toca-ddim50", "toca-ddpm250",
                                                                  "toca-pixart")
    for name in score_registry:
        assert ToCaConfig(score=name, forecast_order=1).score == name
    for name in schedule_registry:
        assert ToCaConfig(ratio_schedule=name).ratio_schedule == name


@pytest.mark.parametrize("field", ["spatial_grid", "num_steps", "max_branches", "k_buckets"])
def test_integer_fields_reject_bools(field):
    with pytest.raises(ValueError, match=f"ToCaConfig.{field}=True is invalid"):
        ToCaConfig(**{field: True})


# -- every field validated: finite numbers, real ints (not bools), usable seeds and names ---------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("fresh_ratio", NAN), ("fresh_ratio", True), ("fresh_ratio", "0.1"),
    ("staleness_weight", NAN), ("staleness_weight", INF), ("staleness_weight", True), ("staleness_weight", -1),
    ("spatial_bonus", NAN), ("spatial_bonus", INF), ("spatial_bonus", False),
    ("interval", True), ("interval", 3.0), ("max_branches", True), ("num_steps", True), ("num_steps", 0),
    ("spatial_grid", True), ("k_buckets", True), ("tail_fresh", True), ("fresh_steps", (0, True)),
    ("seed", True), ("seed", -1), ("seed", 2 ** 63), ("seed", 1.0),
    ("timestep_arg", ""), ("timestep_arg", "not a name"), ("timestep_arg", 3),
    ("max_captures", 0), ("max_captures", True), ("max_captures", 2.0),
    ("probe", 1), ("compile", 0), ("adaptive_threshold", True),
])
def test_invalid_values_rejected(field, value):
    with pytest.raises(ValueError, match=f"ToCaConfig.{field}="):
        ToCaConfig(**{field: value})


def test_largest_seed_runs_the_random_score():
    import torch
    from conftest import make_dit
    model = toca_fx.transform(make_dit(), interval=2, fresh_ratio=0.5, score="random", seed=2 ** 63 - 1)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        for t in (900, 800, 700):
            model(x, timestep=torch.full((2,), t), class_labels=y)
    assert toca_fx.stats(model).calls["partial"] == 1
