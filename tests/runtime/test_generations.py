"""Finding every generation and CFG branch, however the model is called; faults and threads.

Every test compares against an untransformed twin (exact when every call is fresh) or asserts a
clear ToCaError.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import toca_fx
from conftest import diffusers, make_dit, rel_err

EXACT_FRESH = dict(interval=1)


def _loop(model, steps, *, positional=False, cutoff=None, two_calls=False, heun=False, seed=0, guidance=4.0,
          forward=None):
    """A DDIM (or Heun-like) sampling loop with CFG, in one batch or as two calls per step.

    ``cutoff``: from this step on only the conditional branch is evaluated (a CFG cut-off).
    ``heun``: two model calls per step at different timesteps (t_i, then t_{i+1}).
    ``forward``: the callable used for the model (default: the model itself).
    """
    f = forward or model
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, null = torch.tensor([1, 2]), torch.tensor([10, 10])

    def eps(x, t, only_cond):
        tt = torch.full((2,), int(t))
        call = (lambda xx, lab, tv: f(xx, tv, lab).sample) if positional else \
            (lambda xx, lab, tv: f(xx, timestep=tv, class_labels=lab).sample)
        if only_cond:
            return call(x, cond, tt)[:, :4]
        if two_calls:
            e_c, e_u = call(x, cond, tt)[:, :4], call(x, null, tt)[:, :4]
        else:
            out = call(torch.cat([x, x]), torch.cat([cond, null]), torch.cat([tt, tt]))[:, :4]
            e_c, e_u = out.chunk(2)
        return e_u + guidance * (e_c - e_u)

    ts = list(sch.timesteps)
    with torch.no_grad():
        for i, t in enumerate(ts):
            only_cond = cutoff is not None and i >= cutoff
            e = eps(x, t, only_cond)
            if heun and i + 1 < len(ts):
                e = 0.5 * (e + eps(x, ts[i + 1], only_cond))    # a second evaluation at the next timestep
            x = sch.step(e, t, x).prev_sample
    return x


def _twin(**overrides):
    model = make_dit()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, **overrides)
    return model, ref


# -- generations -------------------------------------------------------------------------------

def test_positional_timestep_is_read_and_each_loop_is_a_new_generation():
    model, _ = _twin(interval=3, fresh_ratio=0.0)
    first = _loop(model, 6, positional=True)
    second = _loop(model, 6, positional=True, seed=1)
    st = toca_fx.stats(model)
    assert st.generations == 2 and st.calls == {"fresh": 4, "partial": 8} and st.timestep_reads == 12
    fresh_model, _ = _twin(interval=3, fresh_ratio=0.0)
    assert torch.equal(second, _loop(fresh_model, 6, positional=True, seed=1))
    assert not torch.equal(first, second)


def test_a_loop_with_another_step_count_starts_fresh():
    model, _ = _twin(interval=3, fresh_ratio=0.0)
    _loop(model, 7)
    out = _loop(model, 4, seed=1)                # its first timestep is below the first loop's first
    fresh_model, _ = _twin(interval=3, fresh_ratio=0.0)
    assert torch.equal(out, _loop(fresh_model, 4, seed=1))
    assert toca_fx.stats(model).generations == 2


def test_shape_change_inside_generation_keeps_num_steps():
    model, _ = _twin(interval=3, fresh_ratio=0.0)
    x = torch.randn(2, 4, 8, 8)
    with toca_fx.generation(model, num_steps=10), torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
        model(x[:1], timestep=torch.tensor([800]), class_labels=torch.tensor([1]))   # new batch size
        assert toca_fx.stats(model).num_steps == 10


@pytest.mark.parametrize("bad", [0, -4, 2.5, "10", True])
def test_generation_num_steps_is_validated(bad):
    model, _ = _twin()
    with pytest.raises(toca_fx.ToCaError, match="num_steps"):
        with toca_fx.generation(model, num_steps=bad):
            pass


def test_self_forward_bypassing_the_model_call_is_still_cached_and_exact():
    """The original DiT's forward_with_cfg calls self.forward: the top-level hook never runs."""
    model, ref = _twin(**EXACT_FRESH)
    out = _loop(model, 5, forward=model.forward)
    assert torch.equal(out, _loop(ref, 5, forward=ref.forward)) or rel_err(out, _loop(ref, 5)) < 1e-5
    st = toca_fx.stats(model)
    assert st.calls["fresh"] >= 4 and all(v["original"] == 0 for v in st.blocks.values())
    cached, _ = _twin(interval=3, fresh_ratio=0.0)
    _loop(cached, 6, forward=cached.forward)
    st = toca_fx.stats(cached)
    assert st.calls["partial"] > 0 and st.generations == 1


# -- one set of CFG rules, on the CPU and on the host-sync-free path ----------------------------

LOOPS = {
    "one-batch CFG": dict(),
    "two calls per step": dict(two_calls=True),
    "heun": dict(heun=True),
    "heun, two calls": dict(heun=True, two_calls=True),
    "CFG cut-off": dict(two_calls=True, cutoff=3),
    "one-batch CFG cut-off": dict(cutoff=3),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_cfg_rules_are_the_same_on_both_paths_and_exact_when_fresh(loop, monkeypatch):
    from toca_fx.runtime import controller as controller_mod

    def run(model, accelerator):
        if accelerator:
            monkeypatch.setattr(controller_mod, "host_read_is_free", lambda t: False)
        try:
            with toca_fx.generation(model, num_steps=6):
                out = _loop(model, 6, **LOOPS[loop])
        finally:
            monkeypatch.undo()
        st = toca_fx.stats(model)
        return out, dict(st.calls), st.branches

    base = make_dit()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    toca_fx.transform(a, interval=3, fresh_ratio=0.25)
    toca_fx.transform(b, interval=3, fresh_ratio=0.25)
    out, calls, branches = run(a, False)
    out2, calls2, branches2 = run(b, True)
    assert calls2 == calls and branches2 == branches and torch.equal(out2, out)
    spec = LOOPS[loop]
    per_step = 2 if spec.get("heun") else 1
    if spec.get("two_calls"):
        cond = 6 * per_step - (1 if spec.get("heun") else 0)
        uncond = cond if spec.get("cutoff") is None else 3 * per_step
        assert branches[0]["step"] == cond and branches[1]["step"] == uncond
    # every call fresh: the original's output on both paths
    ref = copy.deepcopy(base)
    fresh = copy.deepcopy(base)
    toca_fx.transform(fresh, interval=1)
    with toca_fx.generation(fresh, num_steps=6):
        assert rel_err(_loop(fresh, 6, **spec), _loop(ref, 6, **spec)) < 1e-5


def test_after_a_cfg_cutoff_cond_calls_read_cond_caches():
    """FORA with two calls per step and a cut-off equals FORA on a model that only ever sees cond calls
    for the cond branch: the uncond calls never fill caches the cond calls read."""
    base = make_dit()
    model = copy.deepcopy(base)
    toca_fx.transform(model, "fora", interval=2)
    _loop(model, 6, two_calls=True, cutoff=3)
    st = toca_fx.stats(model)
    assert st.branches[0]["step"] == 6 and st.branches[1]["step"] == 3


# -- faults --------------------------------------------------------------------------------------

class _FailOnce:
    """A forward pre-hook on one submodule that raises on its n-th call."""

    def __init__(self, n, exc=RuntimeError):
        self.n, self.exc, self.count = n, exc, 0

    def __call__(self, module, args):
        self.count += 1
        if self.count == self.n:
            raise self.exc("injected fault")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_call_that_raises_leaves_the_schedule_as_before_and_the_retry_is_the_same_step(exc):
    model, ref = _twin(interval=3, fresh_ratio=0.0)
    clean, _ = _twin(interval=3, fresh_ratio=0.0)
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(6)
    x = torch.randn(4, 4, 8, 8)
    labels = torch.tensor([1, 2, 10, 10])
    # the 3rd call (a partial one) fails in its second block, after the first block has run
    fault = _FailOnce(3, exc)
    handle = model.transformer_blocks[1].register_forward_pre_hook(fault)
    outs, clean_outs = [], []
    with torch.no_grad():
        for t in sch.timesteps:
            tt = torch.full((4,), int(t))
            try:
                outs.append(model(x, timestep=tt, class_labels=labels).sample)
            except exc:
                outs.append(model(x, timestep=tt, class_labels=labels).sample)    # the retry
            clean_outs.append(clean(x, timestep=tt, class_labels=labels).sample)
    handle.remove()
    st, cst = toca_fx.stats(model), toca_fx.stats(clean)
    assert fault.count >= 3
    assert st.branches == cst.branches and st.generations == 1
    # the retry ran fresh (its caches were partly overwritten); every other call as in the clean run
    assert st.calls == {"fresh": cst.calls["fresh"] + 1, "partial": cst.calls["partial"] - 1}
    for i, (a, b) in enumerate(zip(outs, clean_outs)):
        if i != 2:
            assert torch.equal(a, b), i
    with torch.no_grad():
        assert rel_err(outs[2], ref(x, timestep=torch.full((4,), int(sch.timesteps[2])), class_labels=labels).sample) < 1e-5


# -- threads -------------------------------------------------------------------------------------

def test_two_threads_in_one_generation_get_a_clear_error():
    model, _ = _twin(interval=3, fresh_ratio=0.0)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
    errors = []

    def other():
        try:
            with torch.no_grad():
                model(x, timestep=torch.tensor([800, 800]), class_labels=torch.tensor([1, 2]))
        except toca_fx.ToCaError as e:
            errors.append(str(e))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert errors and "thread" in errors[0]
    # the first thread's generation is intact, and a new generation in the other thread is fine
    assert toca_fx.stats(model).branches[0]["step"] == 1
    done = []

    def fresh_generation():
        with toca_fx.generation(model, num_steps=2), torch.no_grad():
            model(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
            done.append(True)

    th = threading.Thread(target=fresh_generation)
    th.start()
    th.join()
    assert done


def test_concurrent_calls_from_two_threads_are_refused_not_mixed():
    """A second thread entering while a call runs gets a ToCaError; the running call is not disturbed."""
    model, ref = _twin(**EXACT_FRESH)
    x = torch.randn(2, 4, 8, 8)
    inside, release, errors = threading.Event(), threading.Event(), []

    def slow(module, args):
        inside.set()
        release.wait(10)

    h = model.transformer_blocks[0].register_forward_pre_hook(slow)
    ref.transformer_blocks[0].register_forward_pre_hook(lambda m, a: None)
    result = {}

    def first():
        with torch.no_grad():
            result["out"] = model(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2])).sample

    th = threading.Thread(target=first)
    th.start()
    inside.wait(10)
    h.remove()
    try:
        with torch.no_grad():
            model(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
    except toca_fx.ToCaError as e:
        errors.append(str(e))
    release.set()
    th.join()
    assert errors and "second thread" in errors[0]
    with torch.no_grad():
        expect = ref(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2])).sample
    assert rel_err(result["out"], expect) < 1e-5
