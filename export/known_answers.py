"""Known answers: a few real images and what the exported graphs answered for them, stored in the manifest.

The manifest carries every graph's sha256, so a graph replaced together with its hash passed every check: a
randomly initialised trunk started and answered "automobile" with probability 1.000. The exporter therefore
records, for a few of the real test images it verified on, the cascade's answers with every expert run and every
router evaluated (`record_known_answers`); the server runs them again at start-up and refuses graphs that answer
otherwise, or answer anything that is not finite (`check_known_answers`). The images go through the manifest's
own input recipe (scale, mean, std), so an edited recipe is caught as well.

The tolerance allows what another execution provider changes (CUDA, TF32 convolutions) and nothing like another
set of weights. Only numpy and Pillow here (no torch): the service imports this module.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from cascade import CascadeGraphs, run_cascade
from export.manifest import InputSpec, KnownAnswers, Manifest, ManifestError

KNOWN_ANSWER_IMAGES = 4
# |answer - known| <= atol + rtol * |known|, per precision of the graphs.
# int8 graphs round activations to 8 bits at every layer: kernels of other instruction sets (AVX2, AVX-512 VNNI)
# may round a value the other way, which the next layers carry on; another set of weights moves logits by far more.
TOLERANCE = {"float32": (2e-2, 1e-2), "float16": (1e-1, 5e-2), "int8": (1e-1, 5e-2)}


def encode_png(pixels: np.ndarray) -> str:
    """``uint8 [3, H, W]`` RGB pixels as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str, spec: InputSpec) -> np.ndarray:
    """A base64 PNG of the manifest back to ``uint8 [3, H, W]``; it must be RGB at the input's size."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except Exception as error:  # binascii and Pillow errors alike
        raise ManifestError(f"known_answers: an image is not a base64 PNG ({error})") from None
    if image.mode != "RGB" or image.size != (spec.width, spec.height):
        raise ManifestError(
            f"known_answers: an image is {image.mode} {image.size[0]}x{image.size[1]}, not RGB "
            f"{spec.width}x{spec.height}"
        )
    return np.asarray(image).transpose(2, 0, 1)


def normalised(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8 [N, 3, H, W]`` to the model's float32 input, by the manifest's recipe (as the service decodes)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (pixels.astype(np.float32) * np.float32(spec.scale) - mean) / std


def _answers(graphs: CascadeGraphs, pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    result = run_cascade(graphs, normalised(pixels, spec), thresholds=0.0, max_experts=graphs.num_experts)
    # Without routers the cascade reports a NaN per expert boundary (no router was evaluated): nothing to record.
    router_logits = result.router_logits if graphs.has_routers else result.router_logits[:, :0]
    return result.logits, router_logits


def pick_images(images: np.ndarray, count: int = KNOWN_ANSWER_IMAGES) -> np.ndarray:
    """``count`` images spread evenly over ``images`` (which the exporter orders by class)."""
    picked = np.unique(np.linspace(0, len(images) - 1, num=min(count, len(images))).round().astype(np.int64))
    return images[picked]


def record_known_answers(graphs: CascadeGraphs, pixels: np.ndarray, spec: InputSpec) -> KnownAnswers:
    """What ``graphs`` answer for ``uint8 [N, 3, H, W]`` ``pixels``: every expert run, every router evaluated."""
    logits, router_logits = _answers(graphs, pixels, spec)
    if not (np.isfinite(logits).all() and np.isfinite(router_logits).all()):
        raise ManifestError("the graphs answer non-finite values (NaN or infinity) on real images")
    return KnownAnswers(
        images=[encode_png(image) for image in pixels],
        logits=logits.astype(np.float64).tolist(),
        router_logits=router_logits.astype(np.float64).tolist(),
    )


def check_known_answers(graphs: CascadeGraphs, manifest: Manifest) -> None:
    """Run the manifest's known answers through ``graphs``.

    Raises:
        ManifestError: an answer is not finite, or differs from the known one by more than the tolerance.
    """
    known = manifest.known_answers
    pixels = np.stack([decode_png(text, manifest.input) for text in known.images])
    logits, router_logits = _answers(graphs, pixels, manifest.input)
    atol, rtol = TOLERANCE.get(manifest.precision, TOLERANCE["float16"])
    answers = (
        ("class logits", logits, np.asarray(known.logits)),
        ("router logits", router_logits, np.asarray(known.router_logits)),
    )
    for name, got, _ in answers:
        if not np.isfinite(got).all():
            raise ManifestError(f"known-answer check: the graphs answer non-finite {name} (NaN or infinity)")
    for name, got, want in answers:
        excess = np.abs(got - want) - (atol + rtol * np.abs(want))
        if got.shape != want.shape or (excess > 0).any():
            worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            raise ManifestError(
                f"known-answer check failed: the graphs' {name} differ from the exporter's by up to {worst:.3g} "
                f"(allowed {atol:g} + {rtol:g} x |value|): these are not the graphs that were exported and verified; "
                "re-export the model"
            )
