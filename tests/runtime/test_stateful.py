"""A stateful property test of the runtime: any interleaving of model calls and changes a user makes.

Three tiny diffusers DiTs from one seed are changed identically: ``ref`` untransformed, ``exact``
transformed with every call fresh (``interval=1``), ``cached`` transformed with ToCa caching. Rules
interleave calls along sampling loops of random step counts, new loops, ``reset``, batch-size changes,
parameter edits (in place and ``load_state_dict(assign=True)``), attention-processor swaps, forward
hooks added to and removed from block submodules, and train / eval switches. After every call:

- ``exact`` equals ``ref`` (float tolerance): the runtime followed every change;
- the first call of every generation (a new loop, after ``reset``, after a batch change) is fresh on
  ``cached`` (its ``stats`` count one more fresh call) and equals ``ref``; after an assign-load every
  block's caches are invalid, so that call equals ``ref`` too;
- ``cached``'s fresh + partial calls equal the calls made.

What the model cannot tell and the test therefore avoids (README, Limitations): a loop abandoned after
exactly one call, followed by another loop, looks like one loop (a direction needs two timesteps).
"""

from __future__ import annotations

import copy

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import toca_fx
from conftest import ScaledProcessor, make_dit

from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402 (conftest skips without diffusers)

TOL = dict(atol=1e-5, rtol=1e-5)


def _loop(steps: int) -> list[int]:
    return [int(t) for t in torch.linspace(999, 0, steps).round()]


class UserOfATransformedModel(RuleBasedStateMachine):
    @initialize()
    def build(self):
        self.ref = make_dit(num_layers=2)
        self.exact = copy.deepcopy(self.ref)
        self.cached = copy.deepcopy(self.ref)
        toca_fx.transform(self.exact, interval=1)
        toca_fx.transform(self.cached, interval=3, fresh_ratio=0.3)
        self.models = (self.ref, self.exact, self.cached)
        self.loop, self.pos = _loop(4), 0
        self.batch = 2
        self.called_batch = None        # the batch of the last call: a generation starts when it changes
        self.seed = 0
        self.calls = 0
        self.in_generation = 0          # calls since the last generation start (0: the next call starts one)
        self.all_invalid = False        # every block's caches invalid (assign-load): the next call is exact
        self.hooks = []                 # (handles of the three models)

    # -- calls -------------------------------------------------------------------------------
    def _starts_loop(self) -> bool:
        return self.pos >= len(self.loop)

    @precondition(lambda self: not (self._starts_loop() and self.in_generation == 1))
    @rule()
    def call(self):
        if self._starts_loop():
            self.loop, self.pos = _loop(len(self.loop)), 0
            self.in_generation = 0
        if self.batch != self.called_batch:      # 1 -> 3 -> 1 between two calls is no change
            self.in_generation = 0
            self.called_batch = self.batch
        t = self.loop[self.pos]
        self.pos += 1
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.batch, 4, 8, 8, generator=g)
        y = torch.arange(self.batch) % 10
        fresh_before = toca_fx.stats(self.cached).calls.get("fresh", 0)
        outs = []
        for m in self.models:
            torch.manual_seed(self.seed)        # train mode drops class labels at random (DiT's label dropout)
            with torch.no_grad():
                outs.append(m(x, timestep=torch.full((self.batch,), t), class_labels=y).sample)
        ref, exact, cached = outs
        self.calls += 1
        assert torch.allclose(exact, ref, **TOL), f"interval=1 differs at t={t}: {float((exact - ref).abs().max())}"
        if self.in_generation == 0:
            assert toca_fx.stats(self.cached).calls["fresh"] == fresh_before + 1, "a generation's first call was not fresh"
        if self.in_generation == 0 or self.all_invalid:
            assert torch.allclose(cached, ref, **TOL), f"a fresh call differs at t={t}: {float((cached - ref).abs().max())}"
        self.in_generation += 1
        self.all_invalid = False

    @precondition(lambda self: self.in_generation != 1)
    @rule(steps=st.integers(2, 8))
    def new_loop(self, steps):
        self.loop, self.pos = _loop(steps), 0
        self.in_generation = 0

    @rule()
    def reset(self):
        toca_fx.reset(self.exact)
        toca_fx.reset(self.cached)
        self.in_generation = 0

    @rule(batch=st.integers(1, 3))
    def change_batch(self, batch):
        self.batch = batch

    # -- changes to the model ----------------------------------------------------------------
    @rule(block=st.integers(0, 1), scale=st.floats(0.5, 1.5))
    def edit_parameter_in_place(self, block, scale):
        for m in self.models:
            with torch.no_grad():
                m.transformer_blocks[block].ff.net[2].weight.mul_(scale)

    @rule(scale=st.floats(0.8, 1.2))
    def load_state_dict_assign(self, scale):
        state = {k: v * scale for k, v in self.ref.state_dict().items()}
        for m in self.models:
            m.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        self.all_invalid = True

    @rule(block=st.integers(0, 1), scale=st.one_of(st.none(), st.floats(0.5, 1.5)))
    def set_processor(self, block, scale):
        for m in self.models:
            m.transformer_blocks[block].attn1.set_processor(AttnProcessor2_0() if scale is None else ScaledProcessor(scale))

    @rule(block=st.integers(0, 1), scale=st.floats(0.5, 1.5))
    def add_hook(self, block, scale):
        self.hooks.append([m.transformer_blocks[block].ff.register_forward_hook(lambda mod, a, out, s=scale: out * s)
                           for m in self.models])

    @precondition(lambda self: self.hooks)
    @rule(i=st.integers(0, 7))
    def remove_hook(self, i):
        for h in self.hooks.pop(i % len(self.hooks)):
            h.remove()

    @rule(training=st.booleans())
    def train_or_eval(self, training):
        for m in self.models:
            m.train(training)

    @invariant()
    def every_call_counted(self):
        if hasattr(self, "cached"):
            calls = toca_fx.stats(self.cached).calls
            assert calls.get("fresh", 0) + calls.get("partial", 0) == self.calls


UserOfATransformedModel.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
test_user_of_a_transformed_model = UserOfATransformedModel.TestCase
