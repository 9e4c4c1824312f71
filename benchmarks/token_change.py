"""How concentrated is the step-to-step change of each branch over the tokens? (bundled digit DiT)

Token-wise caching pays off when a few tokens carry most of the change of a branch's output from
one denoising step to the next: recomputing the top r of the tokens then removes more than a
fraction r of the reuse error. This script samples the bundled model without caching, records the
output of every self-attention and MLP branch at every step (forward hooks on the diffusers
modules, nothing of toca_fx involved), and reports, per branch, the share of the squared change
||F_t - F_{t-1}||^2 held by the top 10 / 20 / 30 % of the tokens (an oracle that knew the change
could do no better), and how well the previous step's change predicts the current one (overlap
of the top-20 % sets). A uniform spread gives shares of 0.10 / 0.20 / 0.30. It also splits the change
between background tokens (whose patch of the final uncached image is dark: every pixel below 0.15)
and the others: a background share equal to the background fraction means background tokens change
as much as the digit's.

Usage::

    python benchmarks/token_change.py [--steps 50] [--images 50] [--json benchmarks/results/token_change.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toca_fx import demo  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.3)


class Tracker:
    """Per branch, step to step: share of the squared change in the top tokens, overlap of the top-20 %
    sets of consecutive steps, relative change. Online (only the previous output is kept)."""

    def __init__(self):
        self.prev, self.prev_top = None, None
        self.shares = {f: [] for f in FRACTIONS}
        self.overlap, self.rel = [], []
        self.per_token = None                                         # (B, N) squared change summed over steps

    def __call__(self, module, args, out):
        out = out.detach()
        if self.prev is not None:
            d = (out - self.prev).pow(2).sum(-1)                  # (B, N) squared change per token
            self.per_token = d if self.per_token is None else self.per_token + d
            n = d.shape[1]
            order = d.argsort(dim=-1, descending=True)
            total = d.sum(-1).clamp_min(1e-30)
            for f in FRACTIONS:
                k = max(1, int(f * n))
                self.shares[f].append(float((d.gather(1, order[:, :k]).sum(-1) / total).mean()))
            top = order[:, : max(1, int(0.2 * n))]
            if self.prev_top is not None:
                self.overlap.append(float((top.unsqueeze(-1) == self.prev_top.unsqueeze(-2)).any(-1).float().mean()))
            self.prev_top = top
            self.rel.append(float((out - self.prev).norm() / self.prev.norm().clamp_min(1e-30)))
        self.prev = out.clone()

    def summary(self, background: torch.Tensor) -> dict:
        """``background``: (B, N) bool, the tokens of the conditional half (the first B rows) that end up dark."""
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        d = self.per_token[: background.shape[0]]
        return dict(top_share={str(f): mean(v) for f, v in self.shares.items()},
                    top20_overlap_with_previous=mean(self.overlap), relative_change_per_step=mean(self.rel),
                    background_share=float((d * background).sum() / d.sum()))


def record(model, labels, steps: int, seed: int, guidance: float) -> dict[str, dict]:
    trackers: dict[str, Tracker] = {}
    handles = []
    for i, blk in enumerate(model.transformer_blocks):
        for name, mod in (("attn", blk.attn1), ("mlp", blk.ff)):
            trackers[f"block{i}.{name}"] = t = Tracker()
            handles.append(mod.register_forward_hook(t))
    try:
        images = demo.sample(model, labels, num_steps=steps, seed=seed, guidance_scale=guidance)
    finally:
        for h in handles:
            h.remove()
    p = model.config.patch_size
    background = torch.nn.functional.max_pool2d(images, p).flatten(1) < 0.15     # (B, N), token order of the patches
    rows = {k: t.summary(background) for k, t in trackers.items()}
    return rows, float(background.float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=demo.DEFAULT_GUIDANCE)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--weights", type=Path, default=None,
                    help="a directory written by toca_fx.demo.train (default: the bundled model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = demo.load_model(args.weights)
    labels = torch.arange(args.images) % demo.NUM_CLASSES
    rows, bg_fraction = record(model, labels, args.steps, args.seed, args.guidance)
    print(f"{'branch':<14} {'top10%':>7} {'top20%':>7} {'top30%':>7} {'overlap':>8} {'rel.change':>11} {'bg share':>9}")
    for k, r in rows.items():
        s = r["top_share"]
        print(f"{k:<14} {s['0.1']:7.2f} {s['0.2']:7.2f} {s['0.3']:7.2f} {r['top20_overlap_with_previous']:8.2f} "
              f"{r['relative_change_per_step']:11.3f} {r['background_share']:9.2f}")
    print(f"background tokens: {bg_fraction:.2f} of all")
    avg = {str(f): sum(r["top_share"][str(f)] for r in rows.values()) / len(rows) for f in FRACTIONS}
    print("mean over branches: " + ", ".join(f"top {float(f):.0%}: {v:.2f}" for f, v in avg.items()))
    if args.json:
        args.json.write_text(json.dumps(dict(settings=vars(args) | {"json": str(args.json), "weights": args.weights and str(args.weights)}, branches=rows,
                                             mean_top_share=avg, background_fraction=bg_fraction), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
