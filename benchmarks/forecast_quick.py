"""Quick speed-quality check of toca_fx configurations on the bundled digit model (no timing).

Samples ``--images`` digits from the same noise (seed ``--seed``, DDIM 50 steps, the demo's guidance)
uncached and with each configuration, and prints the FLOPs ratio (whole model, FlopCounterMode with
attention counted) and PSNR / SSIM against the uncached samples. Configurations are presets or JSON::

    python benchmarks/forecast_quick.py --seed 0 taylorseer forecast-n4 forecast-n6
    python benchmarks/forecast_quick.py '{"my": {"interval": 4, "forecast_order": 2, "fresh_ratio": 0}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toca_fx  # noqa: E402
from toca_fx import demo  # noqa: E402
from toca_fx.demo import quality  # noqa: E402
from toca_fx.demo.evaluate import count_flops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="preset names or a JSON object {name: config fields}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = {}
    for c in args.configs:
        if c.startswith("{"):
            configs.update({k: toca_fx.ToCaConfig(**v) for k, v in json.loads(c).items()})
        else:
            configs[c] = toca_fx.ToCaConfig.preset(c)
    base = demo.load_model()
    labels = torch.arange(args.images) % demo.NUM_CLASSES
    kw = dict(num_steps=50, seed=args.seed, guidance_scale=demo.DEFAULT_GUIDANCE)
    ref = demo.sample(base, labels, **kw)
    f0 = count_flops(base, labels, **kw)
    for name, cfg in configs.items():
        m = toca_fx.transform(copy.deepcopy(base), cfg)
        images = demo.sample(m, labels, **kw)
        f = count_flops(m, labels, **kw)
        print(f"seed {args.seed}  {name:28s} {f0 / f:5.2f}x  PSNR {quality.psnr(images, ref):6.2f}  "
              f"SSIM {quality.ssim(images, ref):.5f}", flush=True)


if __name__ == "__main__":
    main()
