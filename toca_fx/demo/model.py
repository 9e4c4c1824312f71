"""What the bundled demo is made of: the DiT's configuration, the noise schedule, the digit data
and the small classifier used by the metrics. Shared by the training script and the loader."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES      # diffusers' DiT label table has one extra row, index num_classes, for CFG's null class
DIGIT_SIZE = 16               # sklearn's 8x8 digits, upscaled (bilinear)
IMAGE_SIZE = 16               # the bundled model's images: the digits as they are (train.py --canvas: larger)

# A small class-conditional DiT (adaLN-zero blocks, like DiT-XL/2): 16x16x1 pixels in 2x2 patches = 64 tokens,
# width 4 x 32 = 128, epsilon prediction only (out_channels=1, no learned sigma).
DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
                  sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)

# The DDPM noise schedule used in training; sampling uses DDIM with the same betas. No clipping of the
# predicted x0: with classifier-free guidance, clipping it at high noise ruins the samples (class agreement
# falls to chance at guidance 3 on this model); without, guidance 2-3 gives agreement 1.0.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=False)


def dit_config(canvas: int = IMAGE_SIZE, patch: int = DIT_CONFIG["patch_size"]) -> dict:
    """The DiT's constructor arguments for ``canvas`` x ``canvas`` images in ``patch`` x ``patch`` patches."""
    return dict(DIT_CONFIG, sample_size=canvas, patch_size=patch)


def max_shift(canvas: int = IMAGE_SIZE) -> int:
    """How far training shifts a digit: 1 pixel on the 16x16 digits themselves, a quarter of the margin on a
    larger canvas (4 pixels on 32x32)."""
    return 1 if canvas <= DIGIT_SIZE else (canvas - DIGIT_SIZE) // 4


def load_digits_tensor(canvas: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's handwritten digits, upscaled to 16x16 and centred on a ``canvas`` x ``canvas`` background (-1):
    (1797, 1, canvas, canvas) float images in [-1, 1] and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    if canvas < DIGIT_SIZE:
        raise ValueError(f"canvas {canvas} is smaller than the {DIGIT_SIZE}x{DIGIT_SIZE} digits")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0          # [0, 1], 8x8
    x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    lo = (canvas - DIGIT_SIZE) // 2
    x = F.pad(x.clamp(0, 1) * 2 - 1, (lo, canvas - DIGIT_SIZE - lo) * 2, value=-1.0)
    return x, torch.tensor(digits.target, dtype=torch.int64)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with the background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


class DigitClassifier(nn.Module):
    """A small CNN on ``image_size`` x ``image_size`` digit images in [-1, 1] (16 for the bundled model; a power
    of two). ``features`` is its penultimate layer (the Frechet space)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, image_size=image_size)
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()]       # 16x16 -> 8x8
        size = image_size // 2
        while size > 4:                                                                 # halve down to 4x4
            layers += [nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU()]
            size //= 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
