"""Decoding uploads: every Pillow mode to RGB, EXIF orientation, first frame, limits checked before decoding."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.manifest import InputSpec
from service.decode_pool import DecodePool
from service.errors import ImageTooLargeError, InvalidImageError, OverloadedError
from service.images import ImageDecoder, default_max_pixels, to_rgb
from tests.server_process import REPO_ROOT, cifar10_test_images
from tests.service.conftest import png_header

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
SPEC = InputSpec(height=32, width=32, mean=MEAN, std=STD)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decoded_rgb(array: np.ndarray) -> np.ndarray:
    """Undo the normalisation: [3, H, W] normalised -> [H, W, 3] pixel values 0-255."""
    pixels = array.transpose(1, 2, 0) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
    return pixels * 255.0


@pytest.fixture
def decoder() -> ImageDecoder:
    return ImageDecoder(SPEC, max_pixels=1_000_000)


def test_real_jpeg_is_normalised_as_the_manifest_says(decoder: ImageDecoder) -> None:
    _, data = cifar10_test_images(per_class=1)[0]
    array = decoder.decode(data)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    expected = ((rgb / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)
    assert array.shape == (3, 32, 32) and array.dtype == np.float32 and array.flags.c_contiguous
    np.testing.assert_allclose(array, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "expected"),
    [
        ("RGB", (200, 30, 60), "PNG", (200, 30, 60)),
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("RGBA", (10, 200, 30, 255), "PNG", (10, 200, 30)),
        ("RGBA", (10, 200, 30, 0), "PNG", (255, 255, 255)),  # fully transparent: the white background
        ("LA", (40, 255), "PNG", (40, 40, 40)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("I;16", 32896, "PNG", (128, 128, 128)),  # 16-bit is scaled, not clipped at 255
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("F", 99.0, "TIFF", (99, 99, 99)),
        ("YCbCr", (76, 85, 255), "JPEG", (254, 0, 0)),
    ],
)
def test_every_mode_becomes_rgb(
    decoder: ImageDecoder, mode: str, colour: object, fmt: str, expected: tuple[int, int, int]
) -> None:
    data = encode(Image.new(mode, (40, 24), colour), fmt)
    pixels = decoded_rgb(decoder.decode(data))
    tolerance = 6.0 if fmt == "JPEG" else 0.6
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), expected, atol=tolerance)


def test_palette_with_transparency_is_composited(decoder: ImageDecoder) -> None:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 16, 32, 32))  # bottom half: palette index 1 (blue), marked transparent
    data = encode(image, "PNG", transparency=1)
    pixels = decoded_rgb(decoder.decode(data))
    np.testing.assert_allclose(pixels[:8].mean(axis=(0, 1)), (255, 0, 0), atol=0.6)
    np.testing.assert_allclose(pixels[-8:].mean(axis=(0, 1)), (255, 255, 255), atol=0.6)


def test_exif_orientation_is_applied(decoder: ImageDecoder) -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 = display rotated 90 degrees clockwise,
    # so upright the red half is on top.
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = decoded_rgb(decoder.decode(encode(image, "JPEG", exif=exif, quality=95)))
    top, bottom = pixels[:12].mean(axis=(0, 1)), pixels[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_first_frame_of_an_animation(decoder: ImageDecoder) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    np.testing.assert_allclose(decoded_rgb(decoder.decode(data)).mean(axis=(0, 1)), (255, 0, 0), atol=1.0)


def test_large_jpeg_is_resized(decoder: ImageDecoder) -> None:
    data = encode(Image.new("RGB", (900, 700), (20, 120, 220)), "JPEG", quality=95)
    array = decoder.decode(data)
    assert array.shape == (3, 32, 32)
    np.testing.assert_allclose(decoded_rgb(array).mean(axis=(0, 1)), (20, 120, 220), atol=3.0)


def test_to_rgb_keeps_rgb_untouched() -> None:
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40],
    ids=["zero-bytes", "text", "png-signature-only"],
)
def test_undecodable_bytes_are_invalid(decoder: ImageDecoder, data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        decoder.decode(data)


@pytest.mark.parametrize("kept", [0.3, 0.8])
def test_truncated_jpeg_is_invalid(decoder: ImageDecoder, kept: float) -> None:
    # 30% cuts into the header (Image.open fails), 80% into the scan data (the decode fails).
    _, data = cifar10_test_images(per_class=1)[0]
    with pytest.raises(InvalidImageError):
        decoder.decode(data[: int(len(data) * kept)])


@pytest.mark.parametrize("size", [(1001, 1000), (20_000, 20_000), (100_000, 100_000)])
def test_too_many_pixels_refused_before_decoding(decoder: ImageDecoder, size: tuple[int, int]) -> None:
    # The PNG holds no pixel data: refusing it quickly, with 413's error, proves the check reads only the header.
    # 20000^2 is also above Pillow's own bomb limit (raised inside Image.open), 1001x1000 only above ours.
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        decoder.decode(png_header(*size))
    assert time.perf_counter() - started < 0.5
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS  # Pillow's global setting is left alone


def test_image_at_the_pixel_limit_is_accepted() -> None:
    decoder = ImageDecoder(SPEC, max_pixels=64 * 48)
    assert decoder.decode(encode(Image.new("RGB", (64, 48)), "PNG")).shape == (3, 32, 32)
    with pytest.raises(ImageTooLargeError):
        decoder.decode(encode(Image.new("RGB", (65, 48)), "PNG"))


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A flat 16-bit grayscale PNG: a few tens of kilobytes whatever its size (the issue's 48 KB at 25 MP)."""
    return encode(Image.fromarray(np.full((height, width), 40_000, dtype=np.uint16)), "PNG")


def test_default_pixel_limit_is_fitted_to_the_model() -> None:
    assert default_max_pixels(SPEC) == 2**21  # 32x32: the floor, a full-HD frame
    assert default_max_pixels(InputSpec(height=224, width=224, mean=MEAN, std=STD)) == 64 * 224 * 224
    assert default_max_pixels(InputSpec(height=1024, width=1024, mean=MEAN, std=STD)) == 25_000_000
    decoder = ImageDecoder(SPEC, max_pixels=default_max_pixels(SPEC))
    with pytest.raises(ImageTooLargeError, match="5000x5000"):
        decoder.open(sixteen_bit_png(5000, 5000))
    assert decoder.decode(sixteen_bit_png(1920, 1080)).shape == (3, 32, 32)


PEAK_MEMORY_SCRIPT = """
import resource, sys
from pathlib import Path
from export.manifest import InputSpec
from service.images import ImageDecoder

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

spec = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
decoder = ImageDecoder(spec, max_pixels=25_000_000)
decoder.decode(Path(sys.argv[1]).read_bytes())  # warm: first-use allocations are not the decode's
for path in sys.argv[2:]:
    data = Path(path).read_bytes()
    before = peak_mib()
    decoder.decode(data)
    print(peak_mib() - before)
"""


def test_a_sixteen_bit_png_decodes_without_float_copies(tmp_path: Path) -> None:
    """The issue's case: a 16-bit PNG of 25 MP (about 50 KB) took +565 MB, through float64 copies. Now it costs
    its 16-bit pixels (50 MB) and little else, and one at the default limit (2 MiP) a few megabytes."""
    files = {"warm": sixteen_bit_png(64, 64), "default-limit": sixteen_bit_png(1448, 1448)}
    files["25-megapixels"] = sixteen_bit_png(5000, 5000)
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, *map(str, paths)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    at_default_limit, at_25_megapixels = (float(line) for line in result.stdout.split())
    assert at_default_limit < 20, f"+{at_default_limit:.0f} MiB for a 2 MiP 16-bit PNG"
    assert at_25_megapixels < 100, f"+{at_25_megapixels:.0f} MiB for a 25 MP 16-bit PNG"


def test_a_large_image_is_reduced_before_it_is_converted() -> None:
    """A 16-bit image is resized in 16 bits and an RGBA one box-reduced before compositing: the result is the
    same colour as decoding at full size would give."""
    decoder = ImageDecoder(SPEC, max_pixels=25_000_000)
    gray = decoded_rgb(decoder.decode(sixteen_bit_png(1400, 900)))
    np.testing.assert_allclose(gray.mean(axis=(0, 1)), (156, 156, 156), atol=0.6)  # round(40000 / 257)
    rgba = encode(Image.new("RGBA", (1200, 800), (10, 200, 30, 255)), "PNG")
    np.testing.assert_allclose(decoded_rgb(decoder.decode(rgba)).mean(axis=(0, 1)), (10, 200, 30), atol=0.6)


def test_a_baseline_jpeg_counts_at_the_scale_it_decodes_at() -> None:
    """A 2400x1600 photo decodes at 1/8 scale (300x200): within a 1 MP limit. The same size as a progressive JPEG
    (whose coefficients libjpeg keeps whole) or as a PNG counts at full size and is refused."""
    decoder = ImageDecoder(SPEC, max_pixels=1_000_000)
    photo = Image.new("RGB", (2400, 1600), (20, 120, 220))
    assert decoder.decode(encode(photo, "JPEG", quality=90)).shape == (3, 32, 32)
    for data in (encode(photo, "JPEG", quality=90, progressive=True), encode(photo, "PNG")):
        with pytest.raises(ImageTooLargeError, match="2400x1600"):
            decoder.open(data)


def test_the_decode_pool_refuses_beyond_its_threads_and_queue() -> None:
    release = threading.Event()

    async def scenario() -> list[object]:
        pool = DecodePool(threads=1, queue_size=1)
        running = [asyncio.ensure_future(pool.run(release.wait, 10.0)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match="decoding"):
            await pool.run(release.wait, 10.0)
        release.set()
        outcomes = await asyncio.gather(*running)
        assert pool.busy == 0
        pool.close()
        return outcomes

    assert asyncio.run(scenario()) == [True, True]
