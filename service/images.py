"""Turning uploaded bytes into the model's input tensor, safely.

`ImageDecoder.open` reads only the header and refuses an image whose width x height exceeds the pixel limit, so a
decompression bomb (a small file claiming huge dimensions) is refused before any pixel is decoded. This module
never changes Pillow's global settings (``Image.MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``): the limit is
checked here, and Pillow's own bomb error (raised by ``Image.open`` above twice its global limit) is mapped to the
same 413.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from export.manifest import InputSpec
from service.errors import ImageTooLargeError, InvalidImageError, ServiceError, first_line

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
# Transparent pixels are composited onto white, the usual background of product shots and icons.
_BACKGROUND = (255, 255, 255, 255)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255 (a white image); scale the full range instead.
    values = np.asarray(image).astype(np.float64)
    eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode Pillow decodes to 8-bit RGB (alpha composited onto white, 16-bit scaled, CMYK converted)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


class ImageDecoder:
    """Decodes uploads into normalised ``[3, H, W]`` float32 arrays as the manifest's `InputSpec` says."""

    def __init__(self, spec: InputSpec, *, max_pixels: int) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self._size = (spec.width, spec.height)
        self._resample = _RESAMPLE[spec.resize]
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._std = np.asarray(spec.std, dtype=np.float32)

    def open(self, data: bytes) -> Image.Image:
        """Identify the image and check its size from the header alone (no pixel is decoded yet).

        Raises:
            InvalidImageError: empty body, or not an image Pillow can identify.
            ImageTooLargeError: more pixels than the limit.
        """
        if not data:
            raise InvalidImageError("the request body is empty: send the image bytes")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"image refused before decoding: {error}") from None
        except UnidentifiedImageError:
            raise InvalidImageError("not an image: no decoder recognises these bytes") from None
        except Exception as error:  # Pillow signals a bad file with many exception types
            raise InvalidImageError(f"not a decodable image: {first_line(error)}") from None
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidImageError(f"image has an empty size {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, above the limit of {self.max_pixels}"
            )
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Decode the first frame, apply EXIF orientation, convert to RGB, resize and normalise.

        Raises:
            InvalidImageError: truncated or corrupt pixel data, or a mode that cannot be converted.
        """
        try:
            image.seek(0)  # first frame of an animation
            self._reduce_while_decoding(image)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
            if rgb.size != self._size:
                rgb = rgb.resize(self._size, self._resample)
            pixels = np.asarray(rgb, dtype=np.float32)
        except ServiceError:
            raise
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"image refused: {error}") from None
        except Exception as error:
            raise InvalidImageError(f"cannot decode the image: {first_line(error)}") from None
        finally:
            image.close()
        normalised = (pixels * np.float32(self.spec.scale) - self._mean) / self._std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def decode(self, data: bytes) -> np.ndarray:
        """`open` then `to_array`: bytes to a normalised ``[3, H, W]`` float32 array."""
        return self.to_array(self.open(data))

    def _reduce_while_decoding(self, image: Image.Image) -> None:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: much cheaper for large photos, never below target.
        width, height = self._size
        if image.format != "JPEG" or image.width < 2 * width or image.height < 2 * height:
            return
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
            width, height = height, width
        image.draft("RGB", (width, height))
