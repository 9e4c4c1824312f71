"""The bundled demo: a small class-conditional DiT trained on sklearn's handwritten digits, and the tools
to sample it and measure the samples.

Example::

    import toca_fx, toca_fx.demo as demo
    model = demo.load_model()                              # diffusers DiTTransformer2DModel, fp32, CPU
    labels = torch.arange(10)
    ref = demo.sample(model, labels, num_steps=50, seed=0)  # (10, 1, 16, 16) in [0, 1]
    toca_fx.transform(model, "toca-digits")
    out = demo.sample(model, labels, num_steps=50, seed=0)  # same noise; one ToCa generation
    print(demo.metrics(out, ref, labels))                  # psnr, ssim, class_agreement, frechet_distance

The weights ship in ``toca_fx/demo/weights`` and were trained by ``python -m toca_fx.demo.train``
(see ``toca_fx/demo/TRAINING.md``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch

from . import quality
from .model import (DIGIT_SIZE, DIT_CONFIG, IMAGE_SIZE, NULL_LABEL, NUM_CLASSES, SCHEDULE, DigitClassifier, load_digits_tensor,
                    max_shift, random_shift)

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 1.5    # DiT-XL/2's setting for FID; class agreement 0.99 on this model

__all__ = ["load_model", "sample", "load_classifier", "metrics", "real_digits", "WEIGHTS", "DEFAULT_STEPS",
           "DEFAULT_GUIDANCE", "NUM_CLASSES", "NULL_LABEL", "IMAGE_SIZE", "DIT_CONFIG", "SCHEDULE"]


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The bundled digit DiT (a diffusers ``DiTTransformer2DModel``, fp32, eval mode).

    Loaded with ``from_pretrained`` on a local directory, as a user would load their own model;
    ``path`` is a directory holding ``transformer/`` (default: the weights shipped in the package).
    """
    from diffusers import DiTTransformer2DModel

    root = Path(path) if path is not None else WEIGHTS
    # Without accelerate, diffusers warns unless low-memory loading is turned off explicitly.
    extra = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    model = DiTTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32, **extra)
    return model.to(device).eval()


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The bundled digit classifier (16x16 digits in [-1, 1]; ``.features`` is the Frechet feature space)."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else WEIGHTS
    clf = DigitClassifier(**json.loads((root / "classifier.json").read_text()))
    clf.load_state_dict(load_file(str(root / "classifier.safetensors")))
    return clf.to(device).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def _progress(iterable, desc: str | None, **options):
    """A tqdm bar on stderr labelled ``desc`` (none when ``desc`` is empty). By default it disappears when done and
    is off when stderr is not a terminal, so logs and pipes stay clean."""
    if not desc:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, **{"leave": False, "disable": None, **options})


@torch.no_grad()
def sample(model, labels, num_steps: int = DEFAULT_STEPS, seed: int = 0,
           guidance_scale: float = DEFAULT_GUIDANCE, progress: str | None = None) -> torch.Tensor:
    """Class-conditional DDIM samples (eta=0) with classifier-free guidance, as diffusers' ``DiTPipeline``.

    ``labels``: class indices (a sequence or int tensor, one image each). The starting noise comes from a CPU
    generator seeded with ``seed``, so a seed gives the same images on every run and device. CFG runs in
    one batch (latents duplicated; labels and the null label 10). A model transformed by toca_fx samples
    as one generation of ``num_steps`` calls (``toca_fx.generation``). ``progress``: a tqdm label, or None.

    Returns images in [0, 1], shape (B, 1, H, W) (H = W = the model's ``sample_size``: 16 for the bundled
    model), float32, on the CPU.
    """
    import toca_fx

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be class indices in [0, {NUM_CLASSES}), got {labels.tolist()}")
    scheduler = _scheduler()
    scheduler.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    x = torch.randn(len(labels), model.config.in_channels, size, size, generator=gen)
    x = (x * scheduler.init_noise_sigma).to(device, dtype)
    cfg = guidance_scale != 1.0
    class_labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)]) if cfg else labels
    class_labels = class_labels.to(device)
    transformed = toca_fx.is_transformed(model)
    ctx = toca_fx.generation(model, num_steps=num_steps) if transformed else contextlib.nullcontext()
    with ctx:
        for t in _progress(scheduler.timesteps, progress):
            x_in = torch.cat([x, x]) if cfg else x
            eps = model(x_in, timestep=t.to(device).expand(x_in.shape[0]), class_labels=class_labels).sample
            if cfg:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


@functools.lru_cache(maxsize=1)
def real_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as a model of ``size`` x ``size`` images sees them, in [0, 1], with their labels:
    the 16x16 digits themselves, or on a larger canvas shifted as in training (a fixed seed)."""
    x, y = load_digits_tensor(size)
    if size > DIGIT_SIZE:
        x = random_shift(x, max_shift(size), torch.Generator().manual_seed(0))
    return (x + 1) / 2, y


@functools.lru_cache(maxsize=4)
def _real_features(classifier) -> torch.Tensor:
    return quality.features(real_digits(classifier.config.get("image_size", IMAGE_SIZE))[0], classifier)


def metrics(images: torch.Tensor, reference_images: torch.Tensor | None = None, labels=None,
            classifier: DigitClassifier | None = None) -> dict:
    """Quality of ``images`` (B, 1, H, W) in [0, 1] (H, W: the classifier's image size).

    * ``psnr`` (dB) and ``ssim`` against ``reference_images`` (e.g. the uncached samples from the same noise),
      when given;
    * ``class_agreement``: fraction classified as ``labels`` by the bundled classifier, when labels are given;
    * ``frechet_distance``: Frechet distance between the classifier's penultimate-layer features of
      ``images`` and of the 1797 real digits (the FID analogue; it is biased upwards for small B, so compare
      values at the same B only).
    """
    classifier = classifier if classifier is not None else _default_classifier()
    out: dict = {}
    if reference_images is not None:
        if reference_images.shape != images.shape:
            raise ValueError(f"reference_images {tuple(reference_images.shape)} and images {tuple(images.shape)} differ")
        out["psnr"] = quality.psnr(images, reference_images)
        out["ssim"] = quality.ssim(images, reference_images)
    if labels is not None:
        out.update(quality.classify(images, torch.as_tensor(labels), classifier))
    out["frechet_distance"] = quality.frechet_distance(quality.features(images, classifier), _real_features(classifier))
    return out


@functools.lru_cache(maxsize=1)
def _default_classifier() -> DigitClassifier:
    return load_classifier()
