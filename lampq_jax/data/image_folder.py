"""A user's folder of JPEG / PNG photos as calibration images: resize, center-crop, normalize.

Every image is read with Pillow (EXIF orientation applied, converted to RGB or grayscale), its
shorter side resized to `size` with the bicubic filter, and the central `size`×`size` square cut
out, so photos of any size and aspect ratio give one batch. Pixel values are then mapped with a
normalization preset named after the convention it belongs to:

    imagenet   (x / 255 − mean) / std, ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225):
               timm, Hugging Face, torchvision, DINOv2
    minus1_1   x / 127.5 − 1, in [-1, 1]: big_vision, Scenic
    unit       x / 255, in [0, 1]

Files are taken in name order; files of other suffixes are skipped. An image Pillow cannot read
is a `ValueError` naming the file.

Example:
    >>> images, files = load_image_folder("photos/", size=224, normalization="imagenet")
    >>> images.shape    # (N, 224, 224, 3) float32
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Normalization:
    """x ↦ (x / 255 − mean) / std per channel, for uint8 pixels x.

    Attributes:
      name: the preset's name.
      mean, std: per channel (RGB), or one value for every channel.
      convention: the model families that expect it.
    """

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    convention: str

    def describe(self) -> str:
        """E.g. "'minus1_1': (x/255 - 0.5) / 0.5, in [-1, 1] (big_vision, Scenic)"."""
        mean = self.mean[0] if len(set(self.mean)) == 1 else self.mean
        std = self.std[0] if len(set(self.std)) == 1 else self.std
        return f"{self.name!r}: (x/255 - {mean}) / {std} ({self.convention})"

    def pixel_range(self) -> tuple[float, float]:
        """(low, high) of normalized [0, 1] pixels over every channel: (min (0 − m) / s, max (1 − m) / s)."""
        return (
            min((0 - m) / s for m, s in zip(self.mean, self.std)),
            max((1 - m) / s for m, s in zip(self.mean, self.std)),
        )


NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization(
        name="imagenet",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        convention="ImageNet mean/std: timm, Hugging Face, torchvision, DINOv2",
    ),
    "minus1_1": Normalization(name="minus1_1", mean=(0.5,), std=(0.5,), convention="[-1, 1]: big_vision, Scenic"),
    "unit": Normalization(name="unit", mean=(0.0,), std=(1.0,), convention="[0, 1]"),
}


def get_normalization(name: str) -> Normalization:
    """The preset `name` ('imagenet', 'minus1_1' or 'unit'); a ValueError names an unknown one."""
    if name not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {name!r}; choose one of: "
            + "; ".join(n.describe() for n in NORMALIZATIONS.values())
        )
    return NORMALIZATIONS[name]


def normalize_images(images: np.ndarray, normalization: str) -> np.ndarray:
    """uint8 images [N, H, W, C] → float32 (x / 255 − mean) / std with the preset `normalization`.

    Args:
      images: [N, H, W, C] uint8 (C = 3, or C = 1 for presets whose mean and std are one value).
      normalization: 'imagenet', 'minus1_1' or 'unit'.

    Returns:
      [N, H, W, C] float32.
    """
    preset = get_normalization(normalization)
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} of shape {images.shape}")
    if len(preset.mean) not in (1, images.shape[-1]):
        raise ValueError(
            f"normalization {normalization!r} has {len(preset.mean)} channels of mean/std; the images "
            f"have {images.shape[-1]} channel(s)"
        )
    mean, std = np.asarray(preset.mean, np.float32), np.asarray(preset.std, np.float32)
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def resize_center_crop(image, size: int) -> np.ndarray:
    """A Pillow image → uint8 [size, size, C]: shorter side resized to `size` (bicubic), central square.

    Args:
      image: a `PIL.Image.Image` in mode 'RGB' or 'L'.
      size: the side of the output square, >= 1.
    """
    from PIL import Image

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)
    return array[..., None] if array.ndim == 2 else array


def read_image(path: str | Path, size: int, *, channels: int = 3) -> np.ndarray:
    """One JPEG / PNG file → uint8 [size, size, channels], EXIF orientation applied (`resize_center_crop`).

    Raises:
      ValueError: naming the file when Pillow cannot read it or its pixels are not 8-bit.
      ImportError: when Pillow is missing.
    """
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImportError("reading JPEG / PNG images needs Pillow: pip install 'lampq_jax[images]'") from None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(
                    f"cannot read image {path}: its pixels are {image.mode} (16-bit or float); "
                    "only 8-bit images are supported"
                )
            image = ImageOps.exif_transpose(image).convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return resize_center_crop(image, size)


def image_files(folder: str | Path) -> list[Path]:
    """The JPEG / PNG files of `folder` (by suffix, any case), sorted by name."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(
    folder: str | Path, *, size: int, normalization: str, channels: int = 3, limit: Optional[int] = None
) -> tuple[np.ndarray, list[Path]]:
    """The JPEG / PNG images of `folder`, resized, center-cropped and normalized.

    Args:
      folder: a directory; files of other suffixes are skipped.
      size: side of the model's square input.
      normalization: 'imagenet', 'minus1_1' or 'unit' (`NORMALIZATIONS`).
      channels: 3 (RGB) or 1 (grayscale).
      limit: read at most this many files (the first in name order).

    Returns:
      (images [N, size, size, channels] float32, the files read).
    """
    get_normalization(normalization)
    files = image_files(folder)
    if not files:
        raise ValueError(f"folder {folder} holds no image with a suffix in {IMAGE_SUFFIXES}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        files = files[:limit]
    raw = np.stack([read_image(f, size, channels=channels) for f in files])
    return normalize_images(raw, normalization), files


def describe_preprocessing(
    folder: str | Path, num_files: int, *, size: int, normalization: str, channels: int = 3
) -> str:
    """One sentence naming what `load_image_folder` did, for reports."""
    mode = "RGB" if channels == 3 else "grayscale"
    return (
        f"{num_files} JPEG/PNG image(s) from {folder}, {mode}, shorter side resized to {size} (bicubic) and "
        f"center-cropped to {size}×{size}, normalized {get_normalization(normalization).describe()}"
    )
