"""FLOPs of a whole sampling loop, original vs toca_fx, counted with FlopCounterMode.

Usage: python benchmarks/flops.py [--json out.json]

Random-weight diffusers models at the token/width ratio of the paper's models (FLOPs do not
depend on the weights). Prints a Markdown table; also writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import toca_fx  # noqa: E402
from conftest import make_dit, make_pixart, sample_dit, sample_pixart  # noqa: E402

CASES = [
    # name, builder, sampler, steps, preset, paper ratio
    ("DiT 28 blocks, 64 tokens, width 288 (DiT-XL/2 ratio), DDIM-50 + CFG",
     lambda: make_dit(num_layers=28, heads=4, head_dim=72, sample=16), sample_dit, 50, "toca-dit-ddim50", 2.32),
    ("PixArt-a 28 blocks, 64 tokens, width 288, DDIM-20 + CFG",
     lambda: make_pixart(num_layers=28, heads=4, head_dim=72, sample=16), sample_pixart, 20, "toca-pixart", 1.93),
]


def run_case(name, build, sample, steps, preset, paper):
    model = build()
    kw = dict(steps=steps, batch=1, sample=16)
    with FlopCounterMode(display=False) as fc:
        sample(model, **kw)
    f0 = fc.get_total_flops()
    toca_fx.transform(model, preset)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as fc, toca_fx.generation(model, num_steps=steps):
        sample(model, **kw)
    f1 = fc.get_total_flops()
    st = toca_fx.stats(model)
    return dict(case=name, preset=preset, steps=steps, flops_original=f0, flops_toca=f1,
                ratio=f0 / f1, stats_ratio=st.flops_ratio, paper_ratio=paper,
                fresh_calls=st.calls.get("fresh", 0), partial_calls=st.calls.get("partial", 0),
                seconds=time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [run_case(*c) for c in CASES]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| case | preset | FLOPs original | FLOPs toca_fx | ratio (FlopCounterMode) | ratio (stats) | paper | fresh/partial calls |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['preset']} | {r['flops_original'] / 1e9:.1f} G | {r['flops_toca'] / 1e9:.1f} G | "
              f"{r['ratio']:.2f}x | {r['stats_ratio']:.2f}x | {r['paper_ratio']:.2f}x | {r['fresh_calls']}/{r['partial_calls']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
