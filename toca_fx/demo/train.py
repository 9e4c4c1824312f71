"""Train the bundled demo models: the digit DiT and the digit classifier used by the metrics.

Usage::

    python -m toca_fx.demo.train --out toca_fx/demo/weights            # both models, seed 0
    python -m toca_fx.demo.train --out /tmp/w --steps 200                # a short run
    python -m toca_fx.demo.train --out /tmp/c --canvas 32 --patch 4      # digits on a 32x32 canvas, 64 tokens

CPU only is fine (the shipped weights were trained on 2 CPU cores with one thread). Writes, under
``--out``: ``transformer/`` (diffusers ``save_pretrained``, safetensors; the EMA weights),
``scheduler/`` (the DDIM scheduler with the training betas), ``classifier.safetensors`` and
``classifier.json``, ``train_log.json`` (command, seed, settings, per-step losses, times, held-out
classifier accuracy, class agreement of samples), ``loss_curve.png`` and ``samples.png``.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 digits), upscaled to 16x16 (bilinear), in [-1, 1],
augmented with random shifts of up to 1 pixel. The DiT learns the DDPM epsilon objective (Min-SNR-5
weighting) with 20% label dropout (label 10, the null class) so that classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _progress
from .evaluate import machine_info
from .model import (DIGIT_SIZE, DIT_CONFIG, IMAGE_SIZE, NULL_LABEL, SCHEDULE, DigitClassifier, dit_config,
                    load_digits_tensor, max_shift, random_shift)

BAR = dict(leave=True, disable=False, mininterval=2.0)   # training bars stay, also in a log file


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation split into (train indices, held-out indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def train_classifier(images, labels, args) -> tuple[DigitClassifier, dict]:
    """A small CNN on 80% of the digits (shifts and a little noise as augmentation); accuracy on the other 20%."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    train_idx, test_idx = split(len(images), 0.2, args.seed)
    clf = DigitClassifier(image_size=args.canvas)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / 64)
    total = args.classifier_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    losses = []
    clf.train()
    for step in _progress(range(total), "classifier", **BAR):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=gen)]
        x = random_shift(images[idx], max_shift(args.canvas), gen)
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(clf(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    clf.eval()
    with torch.no_grad():
        acc = (clf(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return clf, dict(losses=losses, held_out_accuracy=acc, train_size=len(train_idx), held_out_size=len(test_idx),
                     epochs=args.classifier_epochs, batch=64, lr=2e-3)


def _lr(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_dit(images, labels, args):
    """DDPM epsilon objective on all digits, label dropout, AdamW, EMA of the weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    config = dit_config(args.canvas, args.patch)
    model = DiTTransformer2DModel(**config)
    # diffusers' LabelEmbedding drops labels by itself in training mode, independently in each block's
    # adaLN; drop them once per sample here instead, so every block sees the same (null) label.
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULE)
    weight = None
    if args.min_snr > 0:   # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR
        snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
        weight = snr.clamp(max=args.min_snr) / snr
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses = []
    model.train()
    bar = _progress(range(args.steps), "DiT", **BAR)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, args)
        idx = torch.randint(0, len(images), (args.batch,), generator=gen)
        x0 = random_shift(images[idx], max_shift(args.canvas), gen)
        y = labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.label_dropout] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        err = (model(xt, timestep=t, class_labels=y).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (err * weight[t]).mean() if weight is not None else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema, dict(losses=losses, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                     ema=args.ema, label_dropout=args.label_dropout, min_snr_gamma=args.min_snr, augmentation=f"random shift <= {max_shift(args.canvas)} px",
                     schedule=SCHEDULE, config=config)


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, k):
        out, acc = [], 0.0
        for i, x in enumerate(v):
            acc += x - (v[i - k] if i >= k else 0.0)
            out.append(acc / min(i + 1, k))
        return out

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    d = log["dit"]["losses"]
    axes[0].plot(d, alpha=0.25, lw=0.5, color="C0")
    axes[0].plot(smooth(d, 50), color="C0", label="moving mean (50)")
    axes[0].set(title="DiT: DDPM epsilon MSE", xlabel="step", ylabel="loss", yscale="log")
    axes[0].legend()
    c = log["classifier"]["losses"]
    axes[1].plot(c, alpha=0.25, lw=0.5, color="C1")
    axes[1].plot(smooth(c, 20), color="C1", label="moving mean (20)")
    axes[1].set(title=f"classifier: cross-entropy (held-out acc {log['classifier']['held_out_accuracy']:.3f})",
                xlabel="step", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_both(args) -> dict:
    """Train the classifier, then the DiT; save both under ``args.out``; return the log."""
    from safetensors.torch import save_file

    images, labels = load_digits_tensor(args.canvas)
    where = f", centred on a {args.canvas}x{args.canvas} canvas" if args.canvas > DIGIT_SIZE else ""
    log = dict(command="python -m toca_fx.demo.train " + " ".join(args.argv), seed=args.seed, threads=args.threads,
               machine=machine_info(), data=f"sklearn.datasets.load_digits, 1797 images 8x8 -> 16x16 bilinear{where}, [-1, 1]")

    t0 = time.perf_counter()
    clf, log["classifier"] = train_classifier(images, labels, args)
    log["classifier"]["seconds"] = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out / "classifier.safetensors"))
    (args.out / "classifier.json").write_text(json.dumps(clf.config, indent=2) + "\n")
    print(f"classifier: held-out accuracy {log['classifier']['held_out_accuracy']:.4f} "
          f"({log['classifier']['seconds']:.0f} s)", file=sys.stderr)

    t0 = time.perf_counter()
    ema, log["dit"] = train_dit(images, labels, args)
    log["dit"]["seconds"] = time.perf_counter() - t0
    last = log["dit"]["losses"][-100:]
    log["dit"]["final_loss_mean_last_100"] = sum(last) / len(last)
    ema.save_pretrained(args.out / "transformer", safe_serialization=True)
    print(f"DiT: final loss (mean of last 100 steps) {log['dit']['final_loss_mean_last_100']:.4f} "
          f"({log['dit']['seconds'] / 60:.1f} min)", file=sys.stderr)

    return log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toca_fx.demo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (e.g. toca_fx/demo/weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4500, help="DiT optimiser steps (default 4500)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--label-dropout", type=float, default=0.2, help="fraction of null labels (default 0.2)")
    ap.add_argument("--min-snr", type=float, default=5.0, help="Min-SNR-gamma loss weighting; 0 disables (default 5)")
    ap.add_argument("--classifier-epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--canvas", type=int, default=IMAGE_SIZE,
                    help=f"image side: {IMAGE_SIZE} (the bundled model) or larger, the digit centred on a background canvas")
    ap.add_argument("--patch", type=int, default=DIT_CONFIG["patch_size"],
                    help=f"DiT patch size (default {DIT_CONFIG['patch_size']}: 64 tokens on {IMAGE_SIZE}x{IMAGE_SIZE})")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: redo the sampling check (and scheduler/, loss_curve.png) on the weights in --out")
    args = ap.parse_args(argv)
    if args.canvas < DIGIT_SIZE or args.canvas & (args.canvas - 1) or args.canvas % args.patch:
        ap.error(f"--canvas {args.canvas} --patch {args.patch}: the canvas must be a power of two >= {DIGIT_SIZE} "
                 "(the classifier halves it down to 4x4) and a multiple of the patch size")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import DDIMScheduler

    if args.eval_only:
        log = json.loads((args.out / "train_log.json").read_text())
        log["eval_command"] = "python -m toca_fx.demo.train " + " ".join(args.argv)
    else:
        log = train_both(args)
    DDIMScheduler(**SCHEDULE).save_pretrained(args.out / "scheduler")

    # A check of the result with the package's own loader: samples of each class, classified.
    from . import DEFAULT_GUIDANCE, load_classifier, load_model, metrics, sample
    from .evaluate import save_grid

    model, classifier = load_model(args.out), load_classifier(args.out)
    eval_labels = torch.arange(100) % 10
    log["eval"] = []
    for g in (1.0, 1.5, 2.0, 3.0):
        imgs = sample(model, eval_labels, num_steps=50, seed=args.seed, guidance_scale=g)
        log["eval"].append(dict(samples=100, num_steps=50, guidance_scale=g,
                                **metrics(imgs, None, eval_labels, classifier=classifier)))
        print(f"samples, guidance {g}: class agreement {log['eval'][-1]['class_agreement']:.3f}, "
              f"Frechet distance {log['eval'][-1]['frechet_distance']:.2f}", file=sys.stderr)
        if g == DEFAULT_GUIDANCE:
            save_grid([(f"DDIM 50 steps, guidance {g}, seed {args.seed}", imgs[:50])], args.out / "samples.png")
    plot_losses(log, args.out / "loss_curve.png")
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
