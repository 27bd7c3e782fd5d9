"""The one preprocessing recipe of training: how an image becomes the model's input.

1. Any image is converted to 8-bit RGB.
2. It is resized to ``image_size`` x ``image_size`` with bilinear filtering, aspect ratio ignored, no crop.
3. Pixels are scaled to [0, 1] (divided by 255) and normalised per channel: ``(x - mean) / std``.

Decoding (image folders), resizing (CIFAR pickles of another size) and normalisation (augmentation, evaluation,
export) all come from here, and the exporter writes :data:`RESIZE`, :data:`CROP` and :data:`PIXEL_SCALE` into
the manifest's input spec, which is what the service follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

RESIZE: Literal["bilinear"] = "bilinear"
CROP: Literal["none"] = "none"
PIXEL_SCALE = 1.0 / 255.0
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR}[RESIZE]


def to_model_size(image: Image.Image, size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: the image in RGB at the model's input size."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), _RESAMPLE)
    return np.asarray(rgb)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [N, 3, H, W]`` RGB images at ``size`` x ``size`` (unchanged when they already are)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = [to_model_size(Image.fromarray(image.transpose(1, 2, 0)), size) for image in images]
    return np.stack(resized).transpose(0, 3, 1, 2)


def channel_vector(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 ``[1, C, 1, 1]`` on ``device``. Made from a sequence it is a copy from the host, which on a GPU waits
    for the device: loops make it once and pass the tensor to :func:`normalize`."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize(
    images_uint8: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` (or floats in 0..255) to float32 ``(x / 255 - mean) / std`` per channel; ``mean`` and
    ``std`` are numbers or :func:`channel_vector` tensors on the images' device."""
    mean_t = channel_vector(mean, images_uint8.device)
    std_t = channel_vector(std, images_uint8.device)
    return (images_uint8.float() / 255.0 - mean_t) / std_t
