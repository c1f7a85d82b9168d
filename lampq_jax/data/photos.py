"""Real photos that ship with scikit-image, cut into crops: calibration and evaluation sets for real ViTs.

Calibration and evaluation crops come from *different* source photos, so a figure measured on the
evaluation crops is held out from calibration in the way that matters (other scenes, not only other
crops of the same scene). Grayscale photos are repeated over three channels.

    calibration sources: astronaut, coffee, rocket, hubble_deep_field, stereo_motorcycle, camera,
                         coins, brick, grass
    evaluation sources:  chelsea, immunohistochemistry, retina, clock, moon, gravel, cell, page

Each crop is a random square (side 35–100 % of the photo's shorter side, random position, random
horizontal flip) resized to `size`² with Pillow's bicubic filter; the crops of a set are spread
evenly over its sources and fixed by `seed`.

Example:
    >>> calib = photo_crops("calibration", 32, 224)    # uint8 [32, 224, 224, 3]
    >>> evaluation = photo_crops("evaluation", 64, 224)
"""

from __future__ import annotations

import numpy as np

CALIBRATION_SOURCES = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "stereo_motorcycle",
    "camera",
    "coins",
    "brick",
    "grass",
)
EVALUATION_SOURCES = ("chelsea", "immunohistochemistry", "retina", "clock", "moon", "gravel", "cell", "page")
SPLITS = {"calibration": CALIBRATION_SOURCES, "evaluation": EVALUATION_SOURCES}


def load_photo(name: str) -> np.ndarray:
    """scikit-image's photo `name` as uint8 RGB [height, width, 3] (grayscale repeated, alpha dropped)."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("real photos need scikit-image: pip install scikit-image") from None
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"photo {name!r} is {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random square crop of `image` [H, W, 3] (side 35–100 % of min(H, W), random flip) as [size, size, 3]."""
    from PIL import Image

    height, width = image.shape[:2]
    side = int(round(min(height, width) * rng.uniform(0.35, 1.0)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = image[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))


def photo_crops(split: str, num: int, size: int, *, seed: int = 0) -> np.ndarray:
    """`num` crops [num, size, size, 3] uint8 from the photos of `split` ('calibration' or 'evaluation').

    Crop k comes from source k mod (number of sources); all randomness is drawn from `seed`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if num < 1 or size < 1:
        raise ValueError(f"num and size must be >= 1, got num={num}, size={size}")
    sources = SPLITS[split]
    photos = {name: load_photo(name) for name in sources}
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    return np.stack([random_crop(photos[sources[k % len(sources)]], size, rng) for k in range(num)])
