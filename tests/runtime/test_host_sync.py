"""No host sync on steady-state calls: a TorchDispatchMode counts the ops that wait for an
accelerator (a tensor's value read on the host) while a transformed model samples, with the
timestep on a simulated accelerator (``controller.host_read_is_free`` made False: on the CPU every
read is free, so toca_fx reads freely there)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import toca_fx
from conftest import make_dit

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.item.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.per_call: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING and self.per_call:
            self.per_call[-1] += 1
        return func(*args, **(kwargs or {}))


def _sample(model, counter, steps=8, separate_cfg=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    with torch.no_grad():
        for t in torch.linspace(999, 0, steps).round():
            batches = [(x, y), (x, null)] if separate_cfg else [(torch.cat([x, x]), torch.cat([y, null]))]
            for xb, yb in batches:
                ts = torch.full((xb.shape[0],), float(t))
                counter.per_call.append(0)
                with counter:
                    out = model(xb, timestep=ts, class_labels=yb).sample
                x = x - 0.01 * out[: x.shape[0], :4]


@pytest.mark.parametrize("within", ["generation()", "plain loop"])
def test_steady_state_calls_make_no_host_sync(within, monkeypatch):
    from toca_fx.runtime import controller as controller_mod

    model = make_dit(num_layers=2)
    ref_counter = SyncCounter()
    _sample(make_dit(num_layers=2), ref_counter)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25)
    counter = SyncCounter()
    _sample(model, counter, steps=3)                   # capture, probe and the first generation: anything goes
    monkeypatch.setattr(controller_mod, "host_read_is_free", lambda t: False)
    counter = SyncCounter()
    if within == "generation()":
        with toca_fx.generation(model, num_steps=8):
            _sample(model, counter)
        extra = [c - r for c, r in zip(counter.per_call, ref_counter.per_call)]
        # the first call: the CFG check (torch.equal, once per generation) and the timestep; the second:
        # the timestep (a new one: one call per step, so it cannot change a decision from here on); then none
        assert extra[:2] == [2, 1] and extra[2:] == [0] * 6, extra
    else:
        _sample(model, counter)
        extra = [c - r for c, r in zip(counter.per_call, ref_counter.per_call)]
        # without a pipeline or generation() a new sampling loop is visible only in the timesteps:
        # one read per call, never more (README, Limitations)
        assert extra[:2] == [2, 1] and extra[2:] == [1] * 6, extra
    assert toca_fx.stats(model).calls["partial"] > 0
