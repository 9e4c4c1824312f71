"""The pass, as one function of named stages (DESIGN.md section 2).

``compile_block`` runs, for one block class and input signature: capture -> analyse -> probe ->
score -> state -> fresh. Partial variants, the last stage, are built on demand by
``BlockProgram.variant`` (the techniques of a step are known only when it runs). Every stage
records its seconds, counts and refusals in the program's ``Recorder``; ``explain()`` reads them.
The runtime only executes programs.

Example::

    program = compile_block(key, block, args, kwargs, block_forward, config)
    program.failed                                  # None, or the Refusal that left the block unchanged
    {name: r.seconds for name, r in program.stages.items()}
    # {'capture': 0.41, 'analyse': 0.05, 'probe': 0.01, 'score': 0.0, 'state': 0.0, 'fresh': 0.01}
"""

from __future__ import annotations

import logging
import math

import torch
import torch.utils._pytree

from .analysis import analyze_block, probe_site, run_with_override
from .analysis.sites import MIXING_KINDS, BlockAnalysis
from .capture import CaptureFailure, capture_block
from .config import ToCaConfig
from .errors import Refusal
from .flops import spec_of
from .passes import build_fresh, resolve_score, site_state
from .program import BlockProgram, count

log = logging.getLogger("toca_fx")


def compile_block(key: tuple, block, args: tuple, kwargs: dict, call_original, config: ToCaConfig) -> BlockProgram:
    """Capture ``block`` on this call and compile it into a ``BlockProgram``; never raises for a
    block it cannot handle: the program is then ``failed`` with the reason and the block runs unchanged.

    The global random state is the same after it as before: capture and probe run the block, and a
    block that draws random numbers (dropout, DiT's label dropout in train mode) must then draw in the
    call what the original would have drawn."""
    with torch.random.fork_rng(devices=rng_devices(args, kwargs)):
        return _compile(key, block, args, kwargs, call_original, config)


def rng_devices(args, kwargs) -> list[int]:
    """The CUDA devices of the call's tensors: the random states fork_rng must keep."""
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return sorted({x.device.index or 0 for x in flat if isinstance(x, torch.Tensor) and x.device.type == "cuda"})


def _compile(key: tuple, block, args: tuple, kwargs: dict, call_original, config: ToCaConfig) -> BlockProgram:
    program = BlockProgram(key=key, cls_name=type(block).__name__, config=config)
    rec = program.recorder
    with rec.stage("capture") as r:
        try:
            program.capture = capture_block(block, args, kwargs, call_original)
        except CaptureFailure as exc:
            program.failed = Refusal("capture-failed", str(exc), stage="capture")
            r.refusals.append(program.failed)
            return program
    try:
        _analyse(program, block, config)
    except Exception as exc:  # never a silently wrong graph: run the block unchanged
        log.warning("toca_fx: %s: analysis failed, block runs unchanged: %s", program.cls_name, exc)
        program.failed = Refusal("analysis-error", f"analysis failed: {type(exc).__name__}: {exc}", stage="analyse")
    # the recorded example values are no longer needed; keep only their metadata
    program.capture.example_inputs = [spec_of(x) for x in program.capture.example_inputs]
    return program


def _analyse(program: BlockProgram, block, config: ToCaConfig) -> None:
    rec, capture = program.recorder, program.capture
    n_lifted = len(capture.lifted)
    with rec.stage("analyse") as r:
        res = analyze_block(capture.gm, n_lifted)
        program.analysis = res
        count(r, sites=len(res.sites), token_wise=sum(s.local for s in res.sites))
        r.refusals.extend(s.refusal for s in res.sites if s.refusal is not None)
        if res.rejected is not None:
            program.failed = res.rejected
            r.refusals.append(res.rejected)
            return
    user_ph = [n for n in capture.gm.graph.nodes if n.op == "placeholder"][n_lifted:]
    program.stream_index = user_ph.index(res.stream_input)
    if config.probe:
        with rec.stage("probe") as r:
            _probe(res, capture, block, r)
    with rec.stage("score") as r:
        # fresh_ratio 0 selects no token on any call: a score would be computed for nothing
        name = config.score if config.fresh_ratio > 0 else "staleness"
        program.score = resolve_score(name, res, config.spatial_bonus, config.spatial_grid)
        if program.score.refusal is not None:
            program.notes.append(program.score.refusal.message)
            r.refusals.append(program.score.refusal)
        side = math.isqrt(res.n_tokens)
        grid = program.score.grid
        if program.score.score.spatial and grid > 1 and (side * side != res.n_tokens or side % grid):
            program.notes.append(f"s4 spatial bonus off: {res.n_tokens} tokens are not a square grid divisible by {grid}")
    with rec.stage("state") as r:
        program.state = {s.name: site_state(s, config) for s in res.sites if s.cacheable}
        count(r, buffers=sum(len(v) for v in program.state.values()))
    with rec.stage("fresh") as r:
        program.fresh, added = build_fresh(capture.gm, res, program.state, program.score, config, program.cache_dtype)
        if program.score.ingredient is not None and not added:
            why = Refusal("score-layout", f"score {config.score!r}: the attention's layout (e.g. grouped-query) gives "
                          "no attention map: staleness only", stage="fresh")
            program.score = resolve_score("staleness", res)
            program.notes.append(why.message)
            r.refusals.append(why)
        count(r, variants=1, **program.fresh.counts)


def _probe(res: BlockAnalysis, capture, block, rec) -> None:
    """Confirm token-locality numerically: perturb one token, only its row of F may move."""
    inputs = capture.lifted_values(block) + list(capture.example_inputs)
    base = run_with_override(capture.gm, inputs, watch=[s.value for s in res.sites])
    for s in res.sites:
        if s.local and s.kind not in MIXING_KINDS:   # mixing kinds move every row by design
            why = probe_site(capture.gm, inputs, s, base)
            if why is not None:
                s.local = False
                s.refusal = why
                s.probe = "refuted: " + why.message
                rec.refusals.append(why)
            else:
                s.probe = "confirmed"
            count(rec, probed=1)
