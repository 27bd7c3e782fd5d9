"""Training augmentation on whole batches of uint8 images, on whatever device they live on.

Matches the reference pipeline (../shared/REFERENCE-RIDE.md 1.3): RandomCrop(size, padding) with zero fill,
horizontal flip with p = 0.5, RandomRotation(degrees) with nearest sampling and zero fill, then /255 and
Normalize (`training.data.preprocess.normalize`). Random numbers come only from the generator passed in and are
drawn on the images' device, which must be the generator's (:func:`augment_generator`): on a GPU nothing is
copied from the host per batch, and the same seed gives the same batch on the same kind of device. (A CPU and a
CUDA generator produce different streams; a run is reproducible, and resumable exactly, on one kind of device.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training.config import DataConfig
from training.data.preprocess import channel_vector, normalize


def augment_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: augmentation draws its random numbers where the images are."""
    return torch.Generator(device=device).manual_seed(seed)


def random_crop(images: torch.Tensor, size: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a ``size`` x ``size`` window at a per-sample random offset."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    if height + 2 * padding < size or width + 2 * padding < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width} images padded by {padding}")
    top = torch.randint(0, height + 2 * padding - size + 1, (batch,), generator=generator, device=images.device)
    left = torch.randint(0, width + 2 * padding - size + 1, (batch,), generator=generator, device=images.device)
    steps = torch.arange(size, device=images.device)
    rows = (top[:, None] + steps)[:, :, None]  # [B, size, 1]
    cols = (left[:, None] + steps)[:, None, :]  # [B, 1, size]
    samples = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the channel last: [B, size, size, C].
    return padded[samples, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 0.5."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each float image about its centre by ``degrees[i]``; nearest sampling, zeros outside."""
    radians = degrees.to(device=images.device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each float image by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    angles = (torch.rand(len(images), generator=generator, device=images.device) * 2.0 - 1.0) * max_degrees
    return rotate(images, angles)


class BatchAugment:
    """Random crop, flip and rotation followed by normalisation, for ``uint8 [B, 3, H, W]`` batches."""

    def __init__(
        self,
        *,
        image_size: int,
        padding: int,
        hflip: bool,
        rotation_degrees: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.image_size = image_size
        self.padding = padding
        self.hflip = hflip
        self.rotation_degrees = rotation_degrees
        self.mean = tuple(mean)
        self.std = tuple(std)
        # The statistics as tensors, made once per device rather than copied from the host for every batch.
        self._statistics: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig) -> BatchAugment:
        return cls(
            image_size=cfg.image_size,
            padding=cfg.crop_padding,
            hflip=cfg.hflip,
            rotation_degrees=cfg.rotation_degrees,
            mean=cfg.mean,
            std=cfg.std,
        )

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented, normalised float32 batch; the same generator state always gives the same output."""
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images_uint8.dtype} {list(images_uint8.shape)}")
        images = random_crop(images_uint8, self.image_size, self.padding, generator)
        if self.hflip:
            images = random_hflip(images, generator)
        if self.rotation_degrees > 0:
            # Rotating the raw pixel values with zero fill matches torchvision: the fill is black, not the mean.
            images = random_rotate(images.float(), self.rotation_degrees, generator)
        if images.device not in self._statistics:
            device = images.device
            self._statistics[device] = (channel_vector(self.mean, device), channel_vector(self.std, device))
        return normalize(images, *self._statistics[images.device])
