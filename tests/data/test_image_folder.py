import numpy as np
import pytest
from PIL import Image

from lampq_jax.data.image_folder import (
    describe_preprocessing,
    load_image_folder,
    normalize_images,
    read_image,
    resize_center_crop,
)
from lampq_jax.data.photos import load_photo

# (photo, saved width, saved height, suffix): landscape, portrait, small, grayscale source, a PNG
MIXED = [
    ("astronaut", 120, 90, ".jpg"),
    ("coffee", 64, 150, ".jpeg"),
    ("rocket", 40, 33, ".JPG"),
    ("camera", 97, 97, ".jpg"),
    ("chelsea", 81, 60, ".png"),
]


def save_photos(folder, entries=MIXED):
    folder.mkdir(exist_ok=True)
    for name, width, height, suffix in entries:
        image = Image.fromarray(load_photo(name)).resize((width, height), Image.BICUBIC)
        image.save(folder / f"{name}{suffix}", quality=95)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_resize_center_crop_keeps_the_middle():
    wide = np.zeros([20, 60, 3], np.uint8)
    wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255  # red | green | blue thirds
    crop = resize_center_crop(Image.fromarray(wide), 10)
    assert crop.shape == (10, 10, 3) and crop.dtype == np.uint8
    assert np.all(crop[:, 3:7, 1] == 255) and np.all(crop[:, 3:7, [0, 2]] == 0)
    tall = resize_center_crop(Image.fromarray(np.transpose(wide, (1, 0, 2))), 10)
    assert np.all(tall[3:7, :, 1] == 255)
    gray = resize_center_crop(Image.fromarray(wide[..., 1]), 7)
    assert gray.shape == (7, 7, 1)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        resize_center_crop(Image.fromarray(wide), 0)


def test_normalization_presets():
    pixels = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(normalize_images(pixels, "unit")[0, 0, :, 0], [0.0, 1.0])
    np.testing.assert_allclose(normalize_images(pixels, "minus1_1")[0, 0, :, 0], [-1.0, 1.0])
    imagenet = normalize_images(pixels, "imagenet")[0, 0]
    np.testing.assert_allclose(imagenet[0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(imagenet[1], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6)
    assert imagenet.dtype == np.float32
    with pytest.raises(ValueError, match="unknown normalization 'zscore'.*imagenet.*big_vision, Scenic"):
        normalize_images(pixels, "zscore")
    with pytest.raises(ValueError, match="'imagenet' has 3 channels.*1 channel"):
        normalize_images(pixels[..., :1], "imagenet")
    with pytest.raises(ValueError, match="must be uint8"):
        normalize_images(pixels.astype(np.float32), "unit")


def test_folder_of_mixed_size_photos(tmp_path):
    folder = save_photos(tmp_path / "photos")
    images, files = load_image_folder(folder, size=32, normalization="imagenet")
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.float32
    assert [f.name for f in files] == sorted(f"{n}{s}" for n, _, _, s in MIXED)  # notes.txt skipped
    assert np.isfinite(images).all() and -2.2 < images.min() and images.max() < 2.7
    # the PNG is lossless: the folder gives exactly the resized, center-cropped, normalized pixels
    png = Image.fromarray(load_photo("chelsea")).resize((81, 60), Image.BICUBIC)
    expected = normalize_images(resize_center_crop(png, 32)[None], "imagenet")[0]
    np.testing.assert_array_equal(images[[f.name for f in files].index("chelsea.png")], expected)
    # a grayscale photo gives three equal channels
    camera = images[[f.name for f in files].index("camera.jpg")] * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406]
    np.testing.assert_allclose(camera[..., 0], camera[..., 2], atol=1e-5)
    first_two, files_two = load_image_folder(folder, size=32, normalization="imagenet", limit=2)
    assert len(files_two) == 2
    np.testing.assert_array_equal(first_two, images[:2])
    gray, _ = load_image_folder(folder, size=16, normalization="unit", channels=1)
    assert gray.shape == (5, 16, 16, 1) and 0.0 <= gray.min() and gray.max() <= 1.0
    text = describe_preprocessing(folder, 5, size=32, normalization="minus1_1")
    assert "5 JPEG/PNG image(s)" in text and "center-cropped to 32×32" in text and "big_vision, Scenic" in text


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros([20, 40, 3], np.uint8)
    image[:10, :, 0] = 255  # top half red, bottom half blue
    image[10:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: red on the right, blue on the left
    Image.fromarray(image).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    crop = read_image(tmp_path / "rotated.jpg", 20)
    assert crop[10, 2, 2] > 200 and crop[10, 2, 0] < 50
    assert crop[10, 17, 0] > 200 and crop[10, 17, 2] < 50


def test_unreadable_images_are_named(tmp_path):
    folder = save_photos(tmp_path / "photos", MIXED[:2])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        load_image_folder(folder, size=16, normalization="unit")
    Image.fromarray(np.full([8, 8], 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: its pixels are I;16"):
        read_image(tmp_path / "deep.png", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        load_image_folder(tmp_path / "empty", size=16, normalization="unit")
    with pytest.raises(ValueError, match="unknown normalization"):
        load_image_folder(folder, size=16, normalization="imagenet21k")
