"""The paper's training augmentations, applied to a whole batch on the device in one resampling pass.

Each transform is drawn per sample with probability ``p`` (0.5): shift up to +-10% of the side, zoom
0.9-1.1, horizontal flip, rotation up to +-10 degrees, and elastic deformation with alpha 20-40 px and
sigma 7 px at 256 px (alpha and sigma scale with the image side). The affine part becomes one sampling
grid per sample (``torch.nn.functional.affine_grid``); the elastic part adds a Gaussian-smoothed random
displacement field (a separable Gaussian blur, equal to torchvision's ``gaussian_blur``) to that grid;
``grid_sample`` resamples once.
Randomness comes from a ``torch.Generator`` seeded by the caller, so a round is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mdmt.errors import ConfigError
from mdmt.ml.options import AUGMENTS


@dataclass(frozen=True)
class PaperAugment:
    p: float = 0.5
    shift: float = 0.10  # fraction of the side
    zoom: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = 10.0
    flip: bool = True
    elastic_alpha: tuple[float, float] = (20.0, 40.0)  # px at 256 px
    elastic_sigma: float = 7.0  # px at 256 px
    reference_size: int = 256

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x``: float (N, C, H, W) in [0, 1]; returns the augmented batch, same shape and device."""
        n, _, h, w = x.shape
        dev = x.device

        def draw(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen, device=gen.device).to(dev)

        def on() -> torch.Tensor:
            return (draw(n) < self.p).float()

        shift = (draw(n, 2) * 2 - 1) * (2 * self.shift) * on().unsqueeze(1)  # grid units span 2
        zoom = 1 + (self.zoom[0] + draw(n) * (self.zoom[1] - self.zoom[0]) - 1) * on()
        angle = (draw(n) * 2 - 1) * math.radians(self.rotate_deg) * on()
        flip = 1 - 2 * on() if self.flip else torch.ones(n, device=dev)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        elastic = on()
        if elastic.any():
            grid = grid + self._elastic(n, h, w, gen, dev) * elastic.view(n, 1, 1, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _elastic(self, n: int, h: int, w: int, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
        scale = min(h, w) / self.reference_size
        sigma = max(self.elastic_sigma * scale, 0.5)
        ksize = 2 * int(math.ceil(3 * sigma)) + 1
        noise = torch.rand(n, 2, h, w, generator=gen, device=gen.device).to(dev) * 2 - 1
        smooth = separable_gaussian_blur(noise, ksize, sigma)
        lo, hi = self.elastic_alpha
        alpha = (lo + torch.rand(n, generator=gen, device=gen.device).to(dev) * (hi - lo)) * scale
        # Simard et al.'s elastic field: alpha x a Gaussian-smoothed uniform field, in px; grid units are 2 / side.
        disp = smooth * alpha.view(n, 1, 1, 1)
        return torch.stack([disp[:, 0] * 2 / w, disp[:, 1] * 2 / h], dim=-1)


def separable_gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding, the same kernel) as two 1-D passes: a 43 px kernel
    costs 86 multiply-adds a pixel instead of 1,849."""
    half = (ksize - 1) * 0.5
    t = torch.linspace(-half, half, ksize, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    c = x.shape[1]
    pad = ksize // 2
    x = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    x = F.conv2d(x, k1.view(1, 1, 1, ksize).expand(c, 1, 1, ksize), groups=c)
    return F.conv2d(x, k1.view(1, 1, ksize, 1).expand(c, 1, ksize, 1), groups=c)


TRANSFORMS = {"paper": PaperAugment(), "none": None}  # one per name of mdmt.ml.options.AUGMENTS


def get_augment(name: str) -> PaperAugment | None:
    if name not in AUGMENTS:
        raise ConfigError(f"augment '{name}' is not one of {', '.join(AUGMENTS)}")
    return TRANSFORMS[name]
