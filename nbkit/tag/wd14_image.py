"""WD14 tagger input: kohya's ``preprocess_image`` (finetune/tag_images_by_wd14_tagger.py) without cv2.

Steps, as kohya: transparency onto white (``open_rgb``), pad to a centred white square
(``pad // 2`` before, the rest after), resize to the model's input size, RGB -> BGR,
float32 in 0-255, HWC (the batch makes it NHWC). Channel order does not change the resizing,
so flipping to BGR last gives the same array as kohya flipping first.

Resizing:

- **Shrinking** uses exact pixel-area averaging, the definition of OpenCV's ``INTER_AREA``
  (each output pixel is the mean of the source area it covers, fractional pixels weighted by
  their covered fraction), computed with prefix sums in float64 and rounded half up to uint8.
  For integer factors this is the block mean, exactly; otherwise it equals cv2 within one grey
  level (cv2 rounds ties to even in some of its code paths). Pillow's ``BOX`` filter is *not*
  the same for non-integer factors: it gives whole pixels weight 1 or 0 by their centres.
  Note: kohya calls ``cv2.resize(image, size, cv2.INTER_AREA)``, where the third positional
  argument is ``dst``, not the interpolation, so kohya actually shrinks with cv2's default
  bilinear (opencv/opencv#19557 explains that call). We keep area averaging, which is what
  kohya's code and docs intend and which does not alias on large photos.
- **Enlarging** is Pillow's ``LANCZOS``, as kohya's ``pil_resize``: identical bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbkit.data.images import open_rgb


def _area_axis(x: np.ndarray, size: int) -> np.ndarray:
    """Sum axis 0 of ``x`` (float64) over ``size`` equal source intervals (fractional pixels weighted)."""
    n = x.shape[0]
    prefix = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])
    edges = np.arange(size + 1) * n / size  # source coordinates of the output pixel borders
    idx = np.minimum(np.floor(edges).astype(np.int64), n - 1)
    frac = (edges - idx).reshape(-1, *([1] * (x.ndim - 1)))
    integral = prefix[idx] + frac * x[idx]  # integral of the pixel values from 0 to each edge
    return integral[1:] - integral[:-1]


def area_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Shrink a square HxWxC uint8 array to ``size`` x ``size`` by pixel-area averaging."""
    if array.shape[0] < size or array.shape[1] < size:
        raise ValueError(f"area_resize only shrinks: {array.shape[:2]} -> {size}")
    n = array.shape[0]
    sums = _area_axis(array.astype(np.float64), size)
    sums = np.moveaxis(_area_axis(np.moveaxis(sums, 1, 0), size), 0, 1)
    out = sums / (n * n / (size * size))  # one division: integer factors give exact block means
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def pad_to_square(array: np.ndarray) -> np.ndarray:
    """Centre an HxWx3 image on a white square (the extra pixel of an odd pad goes right/bottom)."""
    h, w = array.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(array, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image -> the tagger's HWC BGR float32 array (0-255) at ``size`` x ``size``."""
    square = pad_to_square(np.asarray(image.convert("RGB")))
    if square.shape[0] > size:
        square = area_resize(square, size)
    elif square.shape[0] < size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(square[:, :, ::-1], dtype=np.float32)


def load_tagger_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image (EXIF rotation applied, transparency onto white) and preprocess it."""
    return preprocess_image(open_rgb(Path(path)), size)
