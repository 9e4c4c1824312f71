"""Measure one sampling configuration of the demo model, and compare configurations: shared by
``toca-fx demo`` and ``benchmarks/bench.py``.

Each configuration samples the same labels from the same noise (same seed, same scheduler). One run
is a warm-up (toca_fx captures and rewrites the blocks on the first call; torch.compile compiles),
then ``repeats`` timed runs (the median is reported), then one run under ``FlopCounterMode``
(whole model, every op torch dispatches) kept out of the timed runs because counting slows dispatch.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import metrics as image_metrics
from . import sample


def machine_info() -> dict:
    """The CPU model, core count and library versions, for reports."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import diffusers

    import toca_fx

    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers.__version__, python=platform.python_version(), toca_fx=toca_fx.__version__)


@dataclass
class Run:
    """The samples and costs of one configuration."""

    name: str
    images: torch.Tensor
    flops: int
    wall_times: list[float]
    info: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_times)


def _sync(model) -> None:
    p = next(model.parameters())
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


def count_flops(model, labels: torch.Tensor, *, num_steps: int, seed: int, guidance_scale: float,
                before_run: Callable[[], Any] | None = None, progress: str | None = None) -> int:
    """FLOPs of one sampling loop: the whole model, every op torch dispatches, by ``FlopCounterMode``.

    Count on an eager model: torch.compile does not run compiled code under a dispatch mode (toca_fx's
    ``compile=True`` variants, compiled with ``fullgraph=True``, raise), and the graphs are the same."""
    from torch.utils.flop_counter import FlopCounterMode

    if before_run is not None:
        before_run()
    counter = FlopCounterMode(display=False)
    with counter:
        sample(model, labels, num_steps=num_steps, seed=seed, guidance_scale=guidance_scale, progress=progress)
    return counter.get_total_flops()


def measure(model, labels: torch.Tensor, name: str, *, num_steps: int, seed: int, guidance_scale: float,
            repeats: int = 1, before_run: Callable[[], Any] | None = None, progress: bool = True,
            flops: bool = True) -> Run:
    """Warm up, time ``repeats`` sampling loops, count FLOPs of one more (``flops=False``: leave ``Run.flops`` 0
    for the caller to fill with ``count_flops`` on an eager twin). ``before_run`` is called before each loop (e.g.
    to reset a third-party cache); a toca_fx-transformed model needs nothing (``sample`` opens one generation per
    loop)."""
    kw = dict(num_steps=num_steps, seed=seed, guidance_scale=guidance_scale)

    def run(tag: str) -> torch.Tensor:
        if before_run is not None:
            before_run()
        return sample(model, labels, progress=f"{name}: {tag}" if progress else None, **kw)

    images = run("warm-up")
    times, deterministic = [], True
    for i in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        again = run(f"timed {i + 1}/{repeats}")
        _sync(model)
        times.append(time.perf_counter() - t0)
        deterministic = deterministic and torch.equal(again, images)
    n_flops = count_flops(model, labels, before_run=before_run, progress=f"{name}: counting FLOPs" if progress else None,
                          **kw) if flops else 0
    return Run(name=name, images=images, flops=n_flops, wall_times=times, info=dict(repeatable=deterministic))


def compare(runs: list[Run], labels: torch.Tensor, classifier=None) -> list[dict]:
    """One row per run: FLOPs and wall ratios to the first run (the uncached reference; > 1 = cheaper),
    PSNR / SSIM against its samples, class agreement, Frechet distance to the real digits."""
    base = runs[0]
    rows = []
    for r in runs:
        m = image_metrics(r.images, None if r is base else base.images, labels, classifier=classifier)
        rows.append(dict(name=r.name, **r.info, flops=r.flops, flops_ratio=base.flops / r.flops,
                         wall_s=r.wall, wall_times_s=r.wall_times, wall_ratio=base.wall / r.wall,
                         psnr=m.get("psnr"), ssim=m.get("ssim", 1.0 if r is base else None),
                         class_agreement=m["class_agreement"], frechet_distance=m["frechet_distance"]))
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The comparison table (plain text for the terminal, or Markdown)."""
    cols = [("name", "config", "{}"), ("flops_ratio", "FLOPs ratio", "{:.2f}x"), ("wall_ratio", "wall ratio", "{:.2f}x"),
            ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("class_agreement", "class agr.", "{:.3f}"),
            ("frechet_distance", "FD", "{:.3f}")]

    def cell(row, key, fmt):
        v = row.get(key)
        return "-" if v is None else fmt.format(v)

    table = [[c[1] for c in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(t) + " |" for t in table[1:]])
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    fmt_row = lambda t: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(t, widths)))  # noqa: E731
    return "\n".join([fmt_row(table[0]), "-" * (sum(widths) + 2 * (len(cols) - 1))] + [fmt_row(t) for t in table[1:]])


def save_grid(panels: list[tuple[str, torch.Tensor]], path, ncols: int = 10) -> None:
    """A PNG with one panel per (title, images) pair, each a grid of ``ncols`` columns (one per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        rows = -(-b // ncols)
        canvas = torch.ones(rows * (h + 1) + 1, ncols * (w + 1) + 1)
        for i in range(b):
            r, c = divmod(i, ncols)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images[i, 0]
        return canvas

    ncols = min(ncols, len(panels[0][1]))
    rows = -(-len(panels[0][1]) // ncols)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4 * rows / ncols + 0.5), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        ax.imshow(grid(images).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
