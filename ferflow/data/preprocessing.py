"""The one preprocessing path shared by ingest, extract, training and serving.

    bytes --decode_image--> PIL image --to_face_pixels--> uint8 48x48 --normalize--> float32 (N,48,48,1)

`prepare_batch` chains the last two and is what both the extract stage and the
served model call, so a model never sees pixels prepared differently from training.
`decode_face` is the first two for ingest, with a libjpeg-turbo shortcut for the one
input that needs no conversion (a 48x48 grayscale JPEG, i.e. all of FER-2013) that
yields the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

IMAGE_SIZE = 48
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)  # what the models take: one gray channel
# PIL modes deeper than 8 bits: converting them with PIL clips instead of scaling
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# Pillow's own guard (Image.MAX_IMAGE_PIXELS) stays on; we additionally refuse images
# larger than this many pixels before decoding them, and turn its warning into an error.
DEFAULT_MAX_PIXELS = 25_000_000


class ImageError(ValueError):
    """An input that is not a usable image, with the reason."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG/JPEG/BMP/GIF/WebP...) fully, or raise ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        # Pillow raises above 2x Image.MAX_IMAGE_PIXELS but only warns above 1x; refuse that
        # zone too, by size rather than with warnings.catch_warnings() (~20 us a call, not
        # thread-safe, and undone by anything that resets the warning filters).
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageError(
                f"decompression bomb refused: image is {width}x{height} = {width * height} pixels, "
                f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS}"
            )
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        img.load()  # decode now: truncated files fail here, not later
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    return img


def to_grayscale(img: Image.Image) -> Image.Image:
    """8-bit grayscale from any mode: RGB(A), palette, 16/32-bit integer, float, 1-bit."""
    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite onto white so transparent areas do not turn black
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L")


def to_face_pixels(img: Image.Image) -> np.ndarray:
    """Grayscale, centre-crop to a square (keeps the face's aspect ratio), resize to 48x48 uint8."""
    gray = img if img.mode == "L" else to_grayscale(img)  # FER-2013 is already L: no copy
    w, h = gray.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        gray = gray.crop((left, top, left + side, top + side))
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    # same read-only array as np.asarray(gray), without its __array_interface__ detour (~3x slower)
    return np.frombuffer(gray.tobytes(), np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def decode_face(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int], str]:
    """Encoded image -> (uint8 48x48 face, original (width, height), original Pillow mode).

    The same pixels as `to_face_pixels(decode_image(data))`. A 48x48 grayscale JPEG is
    decoded by libjpeg-turbo directly (simplejpeg, ~20 us instead of Pillow's ~70 us: the
    ingest stage's main cost on FER-2013); `strict` turns libjpeg's warnings (a truncated
    or damaged file) into errors, and anything it refuses goes to Pillow, which then
    either decodes it or names the reason.
    """
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg  # here, not at the top: the served model never decodes this way

        try:
            width, height, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if (width, height, colorspace) == (IMAGE_SIZE, IMAGE_SIZE, "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)[:, :, 0], (width, height), "L"
        except ValueError:
            pass
    img = decode_image(data, max_pixels=max_pixels)
    return to_face_pixels(img), img.size, img.mode


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N,48,48) or (N,48,48,1) -> float32 (N,48,48,1) in [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3:
        pixels = pixels[..., np.newaxis]
    if pixels.ndim != 4 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"expected pixels of shape (N, 48, 48[, 1]), got {pixels.shape}")
    # one pass, one float32 array (astype + divide would write two); same values
    return np.divide(pixels, np.float32(255.0), dtype=np.float32)


def prepare_batch(images: Iterable[Image.Image | np.ndarray]) -> np.ndarray:
    """THE preprocessing function: images (PIL or uint8 arrays, any size/mode) -> model input."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        return normalize(images)  # a stack of ready 48x48 faces (the ingested ones): no per-image loop
    faces = []
    for img in images:
        if isinstance(img, np.ndarray):
            if img.dtype == np.uint8 and img.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) and img.ndim == 2:
                faces.append(img)
                continue
            img = Image.fromarray(img)
        faces.append(to_face_pixels(img))
    if not faces:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    return normalize(np.stack(faces))
