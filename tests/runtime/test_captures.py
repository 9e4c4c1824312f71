"""The bounded capture store (toca_fx/runtime/captures.py): least recently used programs evicted."""

from __future__ import annotations

import logging

import torch

import toca_fx
from toca_fx.runtime.captures import CaptureStore
from conftest import make_dit


def test_store_evicts_the_least_recently_used_and_counts_recaptures():
    gone = []
    store = CaptureStore(limit=2, on_evict=lambda k, p: gone.append(k))
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1                 # "a" is now the most recent
    store.put("c", 3)
    assert gone == ["b"] and list(store.keys()) == ["a", "c"]
    store.put("b", 2)
    assert gone == ["b", "a"] and store.evicted == 2 and store.recaptured == 1
    assert store.get("missing") is None and len(store) == 2


def _call(model, batch, t):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        return model(x, timestep=torch.full((batch,), t), class_labels=torch.arange(batch)).sample


def test_captures_are_bounded_and_stats_keep_the_flops_of_evicted_ones(caplog):
    model = toca_fx.transform(make_dit(), interval=2, fresh_ratio=0.5, max_captures=2)
    twin = toca_fx.transform(make_dit(), interval=2, fresh_ratio=0.5)        # unbounded
    for batch in (1, 2, 3):                    # a new input shape per generation: a capture each
        for t in (900, 800):
            torch.testing.assert_close(_call(model, batch, t), _call(twin, batch, t))
    rep = toca_fx.explain(model)
    assert len(rep.programs) == 2 and rep.captures == dict(kept=2, limit=2, evicted=1, recaptured=0)
    assert "captures: 2 kept of at most 2" in str(rep)
    assert len(toca_fx.explain(twin).programs) == 3
    a, b = toca_fx.stats(model), toca_fx.stats(twin)
    assert (a.flops_original, a.flops_actual, a.flops_score) == (b.flops_original, b.flops_actual, b.flops_score)
    assert a.calls == b.calls == {"fresh": 3, "partial": 3}
    with caplog.at_level(logging.WARNING, logger="toca_fx"):
        _call(model, 1, 900)                   # the evicted shape again
    assert toca_fx.explain(model).captures["recaptured"] == 1 and "raise ToCaConfig.max_captures" in caplog.text
