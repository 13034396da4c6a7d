"""Tests of dfa_fast.data.corruptions on real CIFAR-10 images (CPU, a few seconds).

Run with the data folder of the project, e.g.::

    DFA_DATA=/work/shared/data python -m pytest -q tests/test_corruptions.py
"""

import io
import os
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from dfa_fast.data import corruptions
from dfa_fast.data.corruptions import CORRUPTION_TYPES, LEVELS, RANDOM_CORRUPTIONS, TYPE0, TYPE1, corrupt

ALL_NAMES = TYPE0 + TYPE1
CORRUPTING_NAMES = tuple(name for name in ALL_NAMES if name != "original")
NUM_IMAGES = 16


@pytest.fixture(scope="module")
def images():
    """Return 16 real 32 x 32 CIFAR-10 train images (uint8 RGB), spread over the ten classes."""
    data_dir = os.environ.get("DFA_DATA")
    if data_dir is None:
        if not os.path.isdir("/work/shared/data"):
            pytest.skip("set DFA_DATA to the folder holding cifar10-jpeg.zip")
        data_dir = "/work/shared/data"
    archive = os.path.join(data_dir, "cifar10-jpeg.zip")
    if not os.path.isfile(archive):
        pytest.skip(f"{archive} not found; DFA_DATA must hold cifar10-jpeg.zip")
    with zipfile.ZipFile(archive) as zf:
        names = sorted(name for name in zf.namelist() if name.startswith("train/") and name.endswith(".jpg"))
        picked = names[:: len(names) // NUM_IMAGES][:NUM_IMAGES]
        loaded = [np.array(Image.open(io.BytesIO(zf.read(name))).convert("RGB")) for name in picked]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in loaded)
    return loaded


def _corrupt_all(images, name, level, seed_offset=0):
    """Return the corrupted images, image i with its own Generator seeded seed_offset + i."""
    return [corrupt(image, name, level, np.random.default_rng(seed_offset + i)) for i, image in enumerate(images)]


def _mean_distance(images, corrupted):
    """Return the mean absolute pixel difference (0..255 scale) between two image lists."""
    return float(np.mean([np.abs(c.astype(np.float64) - i).mean() for i, c in zip(images, corrupted)]))


def test_public_names():
    assert len(TYPE0) == len(TYPE1) == 10 and len(set(ALL_NAMES)) == 20
    assert CORRUPTION_TYPES == {"type0": TYPE0, "type1": TYPE1}
    assert LEVELS == (1, 2, 3, 4, 5)
    assert RANDOM_CORRUPTIONS < set(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shape_dtype_and_input_untouched(images, name):
    for level in (1, 5):
        for i, image in enumerate(images):
            before = image.copy()
            out = corrupt(image, name, level, np.random.default_rng(i))
            assert out.shape == image.shape and out.dtype == np.uint8
            assert not np.shares_memory(out, image)
            np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_changes_image(images, name):
    for level in (1, 5):
        for image, out in zip(images, _corrupt_all(images, name, level)):
            if name == "original":
                np.testing.assert_array_equal(out, image)
            else:
                assert not np.array_equal(out, image), f"{name} level {level} left an image unchanged"


ELASTIC_NOT_MONOTONE = pytest.mark.xfail(
    strict=True,
    reason="published CIFAR-10-C elastic: level 1 is a pure affine jitter of 0.08 * 32 = 2.6 px, level 5 a "
    "0.96 px jitter plus a small elastic field, so level 5 moves pixels less (about 14 vs 21 levels)",
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=ELASTIC_NOT_MONOTONE) if n == "elastic" else n for n in CORRUPTING_NAMES]
)
def test_level5_stronger_than_level1(images, name):
    distance_1 = _mean_distance(images, _corrupt_all(images, name, 1))
    distance_5 = _mean_distance(images, _corrupt_all(images, name, 5))
    assert distance_5 > distance_1 > 0, f"{name}: level 1 {distance_1:.2f}, level 5 {distance_5:.2f}"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_determinism(images, name):
    for level in (1, 5):
        # A different global numpy / OpenCV RNG state must not matter: all randomness comes from rng.
        np.random.seed(1)
        cv2.setRNGSeed(1)
        first = _corrupt_all(images, name, level, seed_offset=100)
        np.random.seed(2)
        cv2.setRNGSeed(2)
        again = _corrupt_all(images, name, level, seed_offset=100)
        other_seeds = _corrupt_all(images, name, level, seed_offset=200)
        for a, b, c in zip(first, again, other_seeds):
            assert a.tobytes() == b.tobytes()
            if name in RANDOM_CORRUPTIONS:
                assert not np.array_equal(a, c), f"{name} level {level} ignores the seed"
            else:
                np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("size", [48, 64])
def test_other_square_sizes(images, name, size):
    image = cv2.resize(images[0], (size, size), interpolation=cv2.INTER_LINEAR)
    out = corrupt(image, name, 5, np.random.default_rng(0))
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("bad_name", ["Gaussian_noise", "fog ", "", "glass"])
def test_unknown_name_raises(images, bad_name):
    with pytest.raises(ValueError, match="unknown corruption") as error:
        corrupt(images[0], bad_name, 1, np.random.default_rng(0))
    message = str(error.value)
    assert repr(bad_name) in message and "gaussian_noise" in message and "\n" not in message


@pytest.mark.parametrize("bad_level", [0, 6, -1, "3", 2.0, True, None])
def test_bad_level_raises(images, bad_level):
    with pytest.raises(ValueError, match="level") as error:
        corrupt(images[0], "fog", bad_level, np.random.default_rng(0))
    message = str(error.value)
    assert repr(bad_level) in message and "1, 2, 3, 4, 5" in message and "\n" not in message


def test_numpy_integer_level_accepted(images):
    expected = corrupt(images[0], "contrast", 3, np.random.default_rng(0))
    np.testing.assert_array_equal(corrupt(images[0], "contrast", np.int64(3), np.random.default_rng(0)), expected)


@pytest.mark.parametrize(
    "bad_image",
    [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8), np.zeros((32, 30, 3), np.uint8),
     np.zeros((32, 32, 4), np.uint8)],
)
def test_bad_image_raises(bad_image):
    with pytest.raises(ValueError, match="image must be"):
        corrupt(bad_image, "fog", 1, np.random.default_rng(0))


def test_seed_instead_of_generator_raises(images):
    with pytest.raises(TypeError, match="default_rng"):
        corrupt(images[0], "fog", 1, 0)


def test_frost_without_package_names_the_install(images, monkeypatch):
    corruptions._frost_texture.cache_clear()
    monkeypatch.setattr(corruptions.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ImportError, match="pip install imagecorruptions-imaug"):
            corrupt(images[0], "frost", 1, np.random.default_rng(0))
    finally:
        corruptions._frost_texture.cache_clear()


# --------------------------------------------------------------------------------------------------
# Building blocks against the library calls of the published definitions
# --------------------------------------------------------------------------------------------------

def test_gaussian_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    field = np.random.default_rng(0).random((32, 32, 3))
    for sigma in (0.4, 0.7, 1.0):
        expected = ndimage.gaussian_filter(field, (sigma, sigma, 0), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(corruptions._gaussian(field, sigma), expected, atol=1e-12)
    for sigma in (6.4, 0.96):
        expected = ndimage.gaussian_filter(field[..., 0], sigma, mode="reflect", truncate=3.0)
        actual = corruptions._gaussian(field[..., 0], sigma, truncate=3.0, border=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(actual, expected, atol=1e-12)


@pytest.mark.parametrize("zoom", [1.0, 1.06, 1.13, 1.25, 1.75, 2.25])
def test_clipped_zoom_matches_scipy(zoom):
    ndimage = pytest.importorskip("scipy.ndimage")
    field = np.random.default_rng(0).random((32, 32, 3))
    crop = int(np.ceil(32 / zoom))
    top = (32 - crop) // 2
    zoomed = ndimage.zoom(field[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
    trim = (zoomed.shape[0] - 32) // 2
    np.testing.assert_allclose(corruptions._clipped_zoom(field, zoom), zoomed[trim:trim + 32, trim:trim + 32],
                               atol=1e-12)


def test_bilinear_reflect_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    field = rng.random((32, 32, 3))
    rows = np.arange(32.0)[:, None] + rng.normal(0, 3, (32, 32))
    cols = np.arange(32.0)[None, :] + rng.normal(0, 3, (32, 32))
    expected = np.stack(
        [ndimage.map_coordinates(field[..., c], [rows, cols], order=1, mode="reflect") for c in range(3)], axis=-1
    )
    np.testing.assert_allclose(corruptions._bilinear_reflect(field, rows, cols), expected, atol=1e-12)


@pytest.mark.parametrize("scale, shift, value_shift", [(0.3, 0, 0), (2.5, 0.2, 0), (1, 0, 0.3)])
def test_hsv_adjust_matches_skimage(scale, shift, value_shift):
    color = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(0).random((16, 16, 3))
    rgb[:4] = rgb[:4, :, :1]  # grey pixels
    rgb[4:6] = 0.0  # black
    rgb[6, :, :2] = 0.5  # two channels tied at the maximum
    hsv = color.rgb2hsv(rgb)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + shift, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] + value_shift, 0, 1)
    np.testing.assert_allclose(corruptions._adjust_hsv(rgb, scale, shift, value_shift), color.hsv2rgb(hsv), atol=1e-12)


def test_glass_shuffle_matches_published_loop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    row_shift, col_shift = rng.integers(-1, 1, (2, 30, 30))
    expected = image.copy()
    for h in range(31, 1, -1):  # the published sweep, including its view "swap"
        for w in range(31, 1, -1):
            h2, w2 = h + row_shift[h - 2, w - 2], w + col_shift[h - 2, w - 2]
            expected[h, w], expected[h2, w2] = expected[h2, w2], expected[h, w]
    np.testing.assert_array_equal(corruptions._shuffle_pixels(image, row_shift, col_shift, 1), expected)


@pytest.mark.parametrize("angle", [0.0, 30.0, -45.0, -90.0, -120.0])
def test_motion_blur_follows_the_line(angle):
    image = np.zeros((48, 48), np.float64)
    image[24, 24] = 255.0
    blurred = corruptions._motion_blur(image, 9, 2.5, angle)
    # One-sided: a point smears onto the pixels that read it, i.e. to -i * (cos a, sin a) from it.
    taps = np.arange(19)
    cols = 24 - np.ceil(taps * np.cos(np.deg2rad(angle)) - 0.5).astype(int)
    rows = 24 - np.ceil(taps * np.sin(np.deg2rad(angle)) - 0.5).astype(int)
    # Near the diagonal two taps can round to the same pixel; their weights add, as in ImageMagick.
    weights = np.exp(-(taps ** 2) / (2 * 2.5 ** 2))
    expected = np.zeros_like(image)
    np.add.at(expected, (rows, cols), 255 * weights / weights.sum())
    np.testing.assert_allclose(blurred, np.rint(expected), atol=1e-9)
