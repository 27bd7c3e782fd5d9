"""Turning uploaded bytes into the model's input tensor, safely and within a budget.

`ImageDecoder.open` reads only the header and refuses an image that would decode to more pixels than the limit, so
a decompression bomb (a small file claiming huge dimensions) is refused before any pixel is decoded. A baseline
JPEG is decoded at reduced scale (``draft``, down to 1/8 per side), so what counts for it is the reduced size;
every other format counts at its full size (a progressive JPEG too: libjpeg holds all its coefficients). The
default limit is fitted to the model (:func:`default_max_pixels`), so that any accepted image costs a few tens of
megabytes and milliseconds. Decoding never makes float64 copies: large images are box-reduced (``Image.reduce``)
before any mode conversion, 16-bit and float images are resized in their own mode and only then scaled to 8 bits,
with integer arithmetic.

This module never changes Pillow's global settings (``Image.MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``): the
limit is checked here, and Pillow's own bomb error (raised by ``Image.open`` above twice its global limit) is mapped
to the same 413.
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
# Modes whose pixels can be averaged (not palette indices, not bilevel, not 16-bit, which Pillow cannot reduce).
_REDUCIBLE_MODES = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
# Transparent pixels are composited onto white, the usual background of product shots and icons.
_BACKGROUND = (255, 255, 255, 255)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


# The default pixel limit: 64 times the model's input (8 times per side) leaves room for the uploads of a model with
# a large input; small-input models still accept a full-HD frame (2 MiP), and no default is above the old 25 MP.
DEFAULT_PIXELS_PER_INPUT_PIXEL = 64
MIN_DEFAULT_MAX_PIXELS = 2**21
MAX_DEFAULT_MAX_PIXELS = 25_000_000


def default_max_pixels(spec: InputSpec) -> int:
    """The pixel limit when none is set: 64 x the model's input, at least 2 MiP, at most 25 MP."""
    fitted = DEFAULT_PIXELS_PER_INPUT_PIXEL * spec.height * spec.width
    return min(MAX_DEFAULT_MAX_PIXELS, max(MIN_DEFAULT_MAX_PIXELS, fitted))


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255 (a white image); scale the full range instead, rounding
    # v / 257 to the nearest integer in integer arithmetic: (v + 128) // 257 is exact, and uint32 holds it.
    values = np.asarray(image)
    # Mode I is signed 32-bit: clipped into 0..65535, its bits are those of the uint32 value.
    wide = np.clip(values, 0, 65535).view(np.uint32) if values.dtype == np.int32 else values.astype(np.uint32)
    wide += 128
    wide //= 257
    return Image.fromarray(wide.astype(np.uint8), mode="L").convert("RGB")


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
        """Identify the image and check the size it will decode at from the header alone (no pixel is decoded yet).

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
        self._draft(image)
        decoded = image.width * image.height
        if decoded > self.max_pixels:
            reduced = (
                f" (decoded at reduced scale: {image.width}x{image.height})" if image.size != (width, height) else ""
            )
            raise ImageTooLargeError(
                f"image is {width}x{height}{reduced} = {decoded} pixels to decode, above the limit of "
                f"{self.max_pixels} (RIDE_MAX_PIXELS)"
            )
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Decode the first frame, apply EXIF orientation, convert to RGB, resize and normalise.

        Raises:
            InvalidImageError: truncated or corrupt pixel data, or a mode that cannot be converted.
        """
        try:
            image.seek(0)  # first frame of an animation
            image.load()
            upright = ImageOps.exif_transpose(self._reduce(image))
            if upright.mode in _SIXTEEN_BIT_MODES or upright.mode == "F":
                # Resized in its own mode first: converting the full image would copy it at 4 bytes per pixel.
                upright = upright.resize(self._size, self._resample)
            rgb = to_rgb(upright)
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

    def _draft(self, image: Image.Image) -> None:
        # A baseline JPEG decodes at 1/2, 1/4 or 1/8 scale directly (never below the model's input): much cheaper for
        # large photos. Not a progressive one: libjpeg keeps all of its coefficients whatever the output scale.
        width, height = self._size
        if image.format != "JPEG" or "progressive" in image.info:
            return
        if image.width < 2 * width or image.height < 2 * height:
            return
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
            width, height = height, width
        image.draft("RGB", (width, height))

    def _reduce(self, image: Image.Image) -> Image.Image:
        """``image`` box-reduced, before any mode conversion, by the largest integer factor that keeps both sides
        at least twice the model's larger input side: the resize after it then looks as it would on the full
        image (Pillow's own ``reducing_gap`` idea), whatever the EXIF rotation."""
        if image.mode not in _REDUCIBLE_MODES:
            return image
        factor = min(image.width, image.height) // (2 * max(self._size))
        return image.reduce(factor) if factor >= 2 else image
