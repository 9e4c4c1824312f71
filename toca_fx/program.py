"""A ``BlockProgram``: one block class captured for one input signature, compiled by the pipeline.

It holds what the pipeline stages produced (capture, analysis, score plan, the fresh variant, the
partial variants built on demand) and their stage records; it is shared by every block of that
class (each calls the graphs with its own parameters). ``toca_fx.explain(model).programs`` lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .analysis.sites import BlockAnalysis, Site
from .capture import Capture
from .config import ToCaConfig
from .errors import Refusal
from .flops import LinearFlops, TensorSpec, count_flops
from .passes import SelectSettings, StateSpec, VariantGraph, build_partial
from .passes.bindings import ScoreInput, StateInput, StepInput, TokenCount
from .passes.scores import ScorePlan


@dataclass
class StageRecord:
    """One stage of the pipeline on one program: seconds, counts, refusals."""

    name: str
    seconds: float = 0.0
    runs: int = 0
    counts: dict = field(default_factory=dict)
    refusals: list = field(default_factory=list)


class Recorder:
    """Keeps a ``StageRecord`` per stage name (a stage that runs again adds to its record)."""

    def __init__(self):
        self.records: dict[str, StageRecord] = {}

    def stage(self, name: str) -> "_Stage":
        rec = self.records.setdefault(name, StageRecord(name))
        return _Stage(rec)


class _Stage:
    def __init__(self, rec: StageRecord):
        self.rec = rec

    def __enter__(self) -> StageRecord:
        self._t0 = time.perf_counter()
        return self.rec

    def __exit__(self, *exc) -> None:
        self.rec.seconds += time.perf_counter() - self._t0
        self.rec.runs += 1


def count(rec: StageRecord, **counts: int) -> None:
    for k, v in counts.items():
        rec.counts[k] = rec.counts.get(k, 0) + int(v)


@dataclass
class BlockProgram:
    key: tuple
    cls_name: str
    config: ToCaConfig
    capture: Capture | None = None
    analysis: BlockAnalysis | None = None
    failed: Refusal | None = None                    # why the blocks run unchanged
    score: ScorePlan | None = None
    state: dict[str, list[StateSpec]] = field(default_factory=dict)   # site -> its buffers
    fresh: VariantGraph | None = None
    partials: dict = field(default_factory=dict)     # variant key -> VariantGraph
    stream_index: int = 0                            # position of the stream among the user inputs
    recorder: Recorder = field(default_factory=Recorder)
    compiled: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    peers: set = field(default_factory=set)          # fine structures of blocks checked to share it
    _flops: dict = field(default_factory=dict)

    @property
    def sites(self) -> list[Site]:
        return self.analysis.sites if self.analysis is not None else []

    @property
    def stages(self) -> dict[str, StageRecord]:
        return self.recorder.records

    @property
    def batch(self) -> int:
        """The batch size of the stream input (its batch axis: 0, or 1 for a sequence-first stream)."""
        if self.analysis is not None and self.analysis.streams:
            return self.analysis.stream_batch(0)
        return int(self.capture.example_inputs[self.stream_index].shape[0])

    @property
    def cache_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.config.cache_dtype) if self.config.cache_dtype else None

    @property
    def variants(self) -> list[VariantGraph]:
        return ([self.fresh] if self.fresh is not None else []) + list(self.partials.values())

    # -- partial variants: the last stage of the pipeline, run on demand ---------------------
    def variant(self, actions: dict[str, str], paired: bool, block: str | None = None) -> VariantGraph:
        """The partial variant for these per-site techniques (built once, then reused)."""
        key = (tuple(sorted(actions.items())), paired)
        v = self.partials.get(key)
        if v is None:
            cfg = self.config
            select = SelectSettings(paired=paired, stale_weight=float(cfg.staleness_weight),
                                    inv_interval=1.0 / cfg.interval, bonus=self.score.bonus, grid=self.score.grid)
            with self.recorder.stage("partial") as rec:
                v = build_partial(self.capture.gm, self.analysis, actions, self.state, select, cfg,
                                  cache_dtype=self.cache_dtype, key=key, block=block or self.cls_name)
                count(rec, variants=1, **v.counts)
            self.partials[key] = v
        return v

    def runner(self, v: VariantGraph):
        """The callable of a variant: its graph, or the graph compiled (``config.compile``)."""
        if not self.config.compile:
            return v.gm
        fn = self.compiled.get(id(v))
        if fn is None:
            fn = torch.compile(v.gm, fullgraph=True)
            self.compiled[id(v)] = fn
        return fn

    # -- FLOPs (FlopCounterMode on fake tensors, for stats) -----------------------------------
    def extra_input_specs(self, v: VariantGraph, ks: dict[str, int]) -> list:
        """TensorSpecs / ints of the inputs a variant takes beyond the block's own (for FLOP counting)."""
        x = self.capture.example_inputs[self.stream_index]
        b = self.batch
        specs = {s.buffer: s for site in self.state.values() for s in site}
        out = []
        for slot in v.inputs:
            if isinstance(slot, StateInput):
                spec = specs[slot.buffer]
                if spec.node is None:
                    out.append(TensorSpec((b, spec.tokens), (spec.tokens, 1), torch.float32, x.device))
                else:
                    sv = spec.node.meta["val"]
                    out.append(TensorSpec(tuple(sv.shape), tuple(torch.empty(sv.shape).stride()),
                                          self.cache_dtype or sv.dtype, x.device))
            elif isinstance(slot, ScoreInput):
                n = self.analysis.stream_tokens(slot.stream)
                out.append(TensorSpec((b, n), (n, 1), torch.float32, x.device))
            elif isinstance(slot, TokenCount):
                out.append(ks[slot.site])
            elif isinstance(slot, StepInput):
                out.append(TensorSpec((1,), (1,), torch.float32, x.device))
            else:
                raise TypeError(f"no FLOP-counting spec for input slot {slot!r}")
        return out

    def original_flops(self, block) -> int:
        if "original" not in self._flops:
            self._flops["original"] = count_flops(self.capture.gm, self.capture.lifted_values(block)
                                                  + self.capture.example_inputs)
        return self._flops["original"]

    def fresh_flops(self, block) -> int:
        if "fresh" not in self._flops:
            base = self.capture.lifted_values(block) + self.capture.example_inputs
            self._flops["fresh"] = count_flops(self.fresh.gm, base + self.extra_input_specs(self.fresh, {}))
        return self._flops["fresh"]

    def call_flops(self, block, variant_key, ks: dict[str, int]) -> tuple[int, int, int]:
        """(original, actual, of which the score on a fresh call) FLOPs of one call of ``block``:
        the fresh variant (``variant_key`` None) or a partial one with its sites' k."""
        orig = self.original_flops(block)
        if variant_key is None:
            fresh = self.fresh_flops(block)
            return orig, fresh, fresh - orig
        return orig, self.variant_flops(self.partials[variant_key], block, ks), 0

    def variant_flops(self, v: VariantGraph, block, ks: dict[str, int]) -> int:
        lf = self._flops.get(v.key)
        if lf is None:
            sites = [s.site for s in v.inputs if isinstance(s, TokenCount)]
            base = self.capture.lifted_values(block) + self.capture.example_inputs
            lf = LinearFlops(v.gm, lambda kk: base + self.extra_input_specs(v, kk), sites)
            self._flops[v.key] = lf
        return lf(ks)
