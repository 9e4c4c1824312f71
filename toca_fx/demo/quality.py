"""Image-quality measures for the demo: PSNR and SSIM against reference samples, class agreement and the
Frechet distance to real digits in the feature space of the bundled digit classifier (the FID analogue).

Images are float tensors in [0, 1], shape (B, 1, H, W), as ``toca_fx.demo.sample`` returns them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) (data range 1), each image's MSE floored at 1e-10 (100 dB)."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004; data range 1, K1=0.01, K2=0.03) with a Gaussian window over the valid
    region (7x7, sigma 1.5: the 11x11 window of the paper does not fit well in 16x16 images)."""
    x, y = images.double(), reference.double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)
    conv = functools.partial(F.conv2d, weight=w, groups=c)
    mu_x, mu_y = conv(x), conv(y)
    sxx = conv(x * x) - mu_x.pow(2)
    syy = conv(y * y) - mu_y.pow(2)
    sxy = conv(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (sxx + syy + c2))
    return float(s.mean())


@torch.no_grad()
def features(images: torch.Tensor, classifier) -> torch.Tensor:
    """The classifier's penultimate-layer features of images in [0, 1]."""
    return classifier.features(images.float().to(next(classifier.parameters()).device) * 2 - 1).double().cpu()


@torch.no_grad()
def classify(images: torch.Tensor, labels: torch.Tensor, classifier) -> dict:
    """Class agreement: the fraction of images the classifier assigns to the class they were sampled for."""
    pred = classifier(images.float().to(next(classifier.parameters()).device) * 2 - 1).argmax(1).cpu()
    return dict(class_agreement=float((pred == labels.cpu()).float().mean()))


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (rows are samples)."""
    a, b = feat_a.double(), feat_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    # tr (S_a S_b)^(1/2) = sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD).
    ev, vec = torch.linalg.eigh(s_a)
    root_a = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross)
