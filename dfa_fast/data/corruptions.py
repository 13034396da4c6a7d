"""CIFAR-10-C image corruptions with the published 32 px parameters, levels 1..5.

The 19 corruptions of Hendrycks and Dietterich (ICLR 2019) as used by the Corrupted CIFAR-10 benchmark,
plus the identity "original". The parameters are the CIFAR-10-C ones (docs/data.md), not the
stronger ImageNet-C ones that most corruption packages ship. Usage::

    rng = np.random.default_rng(seed)          # one Generator per (image, corruption)
    corrupted = corrupt(image, "fog", 5, rng)  # uint8 H x W x 3 in, new uint8 array out

Conventions shared by every corruption:
- all randomness comes from ``rng``, so one seed gives byte-identical output;
- arithmetic is in float; the result is clipped to [0, 255] and cast to uint8 by truncation, as the
  published generator does (``np.uint8`` of the float image);
- the parameters are the 32 px ones; other square sizes are accepted (fog, frost, elastic and glass
  blur adapt their geometry to the size, every other parameter stays in pixels).

Deviations from the published definitions (each one is also noted where it happens):
- motion blur and the streaks of snow use a line-kernel stand-in for ImageMagick's ``-motion-blur``
  (same one-sided Gaussian taps and tap offsets, edge pixels replicated), see docs/data.md;
- glass blur reproduces what the published loop actually does: its "swap" of two numpy views only
  copies the neighbour into the pixel, so every swept pixel takes the value of a neighbour picked with
  shifts in {-1, 0}; this is computed as one gather instead of a Python loop;
- the water spatter layer is clipped to 255 before its uint8 cast, where the published code lets
  values above 255 wrap around (rare: it needs a smoothed noise value above 1), and an empty water
  mask leaves the image unchanged instead of dividing by zero.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os

import cv2
import numpy as np
from PIL import Image

TYPE0 = ("snow", "frost", "fog", "brightness", "contrast", "spatter", "elastic", "jpeg", "pixelate", "saturate")
TYPE1 = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "original",
)
CORRUPTION_TYPES = {"type0": TYPE0, "type1": TYPE1}
LEVELS = (1, 2, 3, 4, 5)

# Corruptions whose output depends on the rng; the others are deterministic functions of the image.
RANDOM_CORRUPTIONS = frozenset({
    "snow", "frost", "fog", "spatter", "elastic",
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
})

# One entry per level 1..5, in the units and order of the table in docs/data.md.
_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # sigma on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson photon count at full scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction of values
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # sigma of the multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in px
    # (sigma in px, max shift in px, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (disk radius in px, sigma of the 3 x 3 anti-alias blur of the disk)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (radius in px, sigma in px)
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # end of the zoom grid np.arange(1, end, 0.01)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # (amount, plasma decay)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # (image weight, frost weight)
    # (mean, std, zoom, threshold, streak radius px, streak sigma px, image blend)
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    # (loc, scale, sigma px, threshold, intensity, mode 0 water / 1 mud)
    "spatter": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V in HSV
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # (S factor, S offset) in HSV
    "jpeg": (80, 65, 58, 50, 40),  # PIL JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box down-scale factor before the box up-scale
    # (alpha, sigma, affine), each in units of the image size
    "elastic": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "original": (None,) * 5,
}


def corrupt(image: np.ndarray, name: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """Return a new uint8 copy of ``image`` (square S x S x 3 RGB) with corruption ``name`` at ``level``."""
    if name not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of: {', '.join(TYPE0 + TYPE1)}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level not in LEVELS:
        raise ValueError(f"unknown corruption level {level!r}; expected one of: {', '.join(map(str, LEVELS))}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or image.shape[0] != image.shape[1]:
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image must be a square uint8 array of shape (S, S, 3); got shape {shape}, dtype {dtype}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}")
    result = _CORRUPTIONS[name](image, _PARAMS[name][int(level) - 1], rng)
    # Truncating cast, as the published generator's np.uint8(...); the clip keeps it well defined.
    return np.clip(result, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------

def _unit(image: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Return the uint8 image as floats in [0, 1]."""
    return image.astype(dtype) / 255.0


def _gaussian(image: np.ndarray, sigma: float, truncate: float = 4.0, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Return ``image`` Gaussian-smoothed over its two spatial axes (channels kept apart).

    Defaults match skimage.filters.gaussian, which the published code calls: scipy's kernel radius
    int(truncate * sigma + 0.5) and 'nearest' edges (cv2.BORDER_REPLICATE); cv2.BORDER_REFLECT is
    scipy's 'reflect'.
    """
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return image.copy()
    size = 2 * radius + 1
    return cv2.GaussianBlur(image, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=border)


@functools.lru_cache(maxsize=None)
def _zoom_matrix(size: int, zoom: float) -> np.ndarray:
    """Return the (size, size) matrix that applies the published ``clipped_zoom`` along one axis.

    clipped_zoom takes the centred ceil(size / zoom) crop, zooms it with scipy.ndimage.zoom(order=1)
    (whose output length is round(crop * zoom) and which maps the end samples onto the end samples)
    and keeps the centred ``size`` samples; all of that is linear, so it is one matrix per axis.
    """
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    zoomed = int(round(crop * zoom))  # Python's round, as scipy computes the output shape
    trim = (zoomed - size) // 2
    coords = (np.arange(size) + trim) * ((crop - 1) / (zoomed - 1))  # positions inside the crop
    lower = np.floor(coords).astype(np.intp)
    frac = coords - lower
    upper = np.minimum(lower + 1, crop - 1)
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    np.add.at(matrix, (rows, top + lower), 1.0 - frac)
    np.add.at(matrix, (rows, top + upper), frac)
    matrix.flags.writeable = False
    return matrix


def _clipped_zoom(image: np.ndarray, zoom: float) -> np.ndarray:
    """Return the centre of ``image`` (S x S or S x S x C) zoomed in by ``zoom``, same shape."""
    matrix = _zoom_matrix(image.shape[0], float(zoom))
    zoomed_rows = np.tensordot(matrix, image, axes=(1, 0))
    return np.moveaxis(np.tensordot(matrix, zoomed_rows, axes=(1, 1)), 0, 1)


def _motion_kernel(radius: int, sigma: float, angle_deg: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (2-D kernel, anchor (x, y)) of the line motion blur, for cv2.filter2D.

    Stand-in for ImageMagick's MotionBlurImage: 2 * ceil(radius) + 1 taps with one-sided Gaussian
    weights exp(-i^2 / (2 sigma^2)), i = 0, 1, ..., normalised to sum 1; tap i reads the pixel at
    offset (round(i cos a), round(i sin a)) in (x right, y down) image coordinates, rounding halves
    up. The kernel is cropped to the taps' bounding box and the anchor marks tap 0.
    """
    taps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    angle = np.deg2rad(angle_deg)
    dx = np.ceil(taps * np.cos(angle) - 0.5).astype(np.intp)
    dy = np.ceil(taps * np.sin(angle) - 0.5).astype(np.intp)
    kernel = np.zeros((dy.max() - dy.min() + 1, dx.max() - dx.min() + 1))
    np.add.at(kernel, (dy - dy.min(), dx - dx.min()), weights)
    return kernel, (int(-dx.min()), int(-dy.min()))


def _motion_blur(image: np.ndarray, radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """Return ``image`` (floats on the 0..255 scale) motion-blurred and rounded to 8-bit levels.

    The rounding mirrors the published pipeline, which reads ImageMagick's result back as an 8-bit PNG.
    """
    kernel, anchor = _motion_kernel(radius, sigma, angle_deg)
    blurred = cv2.filter2D(image, -1, kernel, anchor=anchor, borderType=cv2.BORDER_REPLICATE)
    return np.rint(blurred)


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Return integer indices folded into [0, size) by half-sample reflection (scipy 'reflect')."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def _bilinear_reflect(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Return ``image`` (H x W x C) sampled bilinearly at (rows, cols), reflecting outside the image.

    Equals scipy.ndimage.map_coordinates(order=1, mode='reflect') as the published elastic transform
    uses, without cv2.remap's 1/32 px quantisation of the interpolation weights.
    """
    height, width = image.shape[:2]
    row0, col0 = np.floor(rows), np.floor(cols)
    row_frac, col_frac = (rows - row0)[..., None], (cols - col0)[..., None]
    row0, col0 = row0.astype(np.intp), col0.astype(np.intp)
    top, bottom = _reflect_index(row0, height), _reflect_index(row0 + 1, height)
    left, right = _reflect_index(col0, width), _reflect_index(col0 + 1, width)
    upper = (1 - col_frac) * image[top, left] + col_frac * image[top, right]
    lower = (1 - col_frac) * image[bottom, left] + col_frac * image[bottom, right]
    return (1 - row_frac) * upper + row_frac * lower


# Hue shape f of grey pixels: skimage gives them hue 0 (red).
_GREY_HUE_SHAPE = np.array([0.0, 1.0, 1.0])


def _adjust_hsv(rgb: np.ndarray, saturation_scale: float = 1.0, saturation_shift: float = 0.0,
                value_shift: float = 0.0) -> np.ndarray:
    """Return RGB in [0, 1] after S -> clip(S * scale + shift) and V -> clip(V + shift), hue kept.

    Same result as skimage.color rgb2hsv -> edit -> hsv2rgb, without the detour through hue: with
    V = max, m = min and S = (V - m) / V, every channel c is V * (1 - S * f_c) where f_c = (V - c) / (V - m)
    depends on the hue only, so a new (S', V') gives c' = V' * (1 - S' * f_c). Grey pixels have hue 0
    (red) in skimage, i.e. f = (0, 1, 1), which is why raising their saturation tints them red.
    """
    value = rgb.max(axis=2, keepdims=True)
    chroma = value - rgb.min(axis=2, keepdims=True)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    hue_shape = np.divide(value - rgb, chroma, out=np.broadcast_to(_GREY_HUE_SHAPE, rgb.shape).copy(),
                          where=chroma > 0)
    saturation = np.clip(saturation * saturation_scale + saturation_shift, 0.0, 1.0)
    value = np.clip(value + value_shift, 0.0, 1.0)
    return value * (1.0 - saturation * hue_shape)


# --------------------------------------------------------------------------------------------------
# The corruptions. Each takes (uint8 image, the parameters of its level, rng) and returns the image on
# the 0..255 scale (float, or uint8 where PIL produces it); corrupt() clips and casts.
# --------------------------------------------------------------------------------------------------

# Noise (Type1)

def _gaussian_noise(image, sigma, rng):
    return (_unit(image) + rng.normal(0.0, sigma, image.shape)) * 255


def _shot_noise(image, photons, rng):
    # Poisson counts of an image with ``photons`` expected counts at full intensity.
    return rng.poisson(_unit(image) * photons) / photons * 255


def _impulse_noise(image, amount, rng):
    # Each value (each channel apart) is hit with probability ``amount``, half pepper and half salt,
    # as skimage.util.random_noise(mode='s&p') in the published code.
    draws = rng.random(image.shape)
    noisy = image.astype(np.float64)
    noisy[draws < amount / 2] = 0.0
    noisy[(draws >= amount / 2) & (draws < amount)] = 255.0
    return noisy


def _speckle_noise(image, sigma, rng):
    unit = _unit(image)
    return (unit + unit * rng.normal(0.0, sigma, image.shape)) * 255


# Blur (Type1)

def _gaussian_blur(image, sigma, rng):
    return _gaussian(_unit(image), sigma) * 255


def _glass_blur(image, params, rng):
    sigma, max_shift, iterations = params
    # The published code quantises the first blur to uint8 (truncating) before shuffling.
    shuffled = (_gaussian(_unit(image), sigma) * 255).astype(np.uint8)
    size = image.shape[0]
    swept = size - 2 * max_shift  # pixels max_shift + 1 .. size - max_shift along each axis
    # Shifts in [-max_shift, max_shift), the published randint's half-open range: {-1, 0} for shift 1.
    shifts = rng.integers(-max_shift, max_shift, size=(iterations, 2, swept, swept))
    for row_shift, col_shift in shifts:
        shuffled = _shuffle_pixels(shuffled, row_shift, col_shift, max_shift)
    return _gaussian(_unit(shuffled), sigma) * 255


def _shuffle_pixels(image: np.ndarray, row_shift: np.ndarray, col_shift: np.ndarray, max_shift: int) -> np.ndarray:
    """Return one sweep of the published glass-blur loop: swept pixel (h, w) <- pixel (h + dy, w + dx).

    The published loop visits h and w from size - max_shift down to max_shift + 1 and "swaps" two
    numpy views, which copies the neighbour into (h, w) and leaves the neighbour as it was. With
    shifts in {-1, 0} (max shift 1, every level) a neighbour is never visited before it is read, so
    the sweep equals this single gather from the unswept image.
    """
    size = image.shape[0]
    start, stop = max_shift + 1, size - max_shift + 1
    rows = np.arange(start, stop)[:, None] + row_shift
    cols = np.arange(start, stop)[None, :] + col_shift
    shuffled = image.copy()
    shuffled[start:stop, start:stop] = image[rows, cols]
    return shuffled


@functools.lru_cache(maxsize=None)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Return the normalised, 3 x 3 Gaussian-smoothed disk kernel of the published defocus blur.

    The published kernel lives on a 17 x 17 grid that is zero beyond radius + 1; this one is cropped
    to that support, which gives the same weights and a much cheaper filter.
    """
    half = int(np.ceil(radius)) + 1
    grid = np.arange(-half, half + 1)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, (3, 3), sigmaX=alias_blur)


def _defocus_blur(image, params, rng):
    return cv2.filter2D(_unit(image), -1, _disk_kernel(*params)) * 255


def _motion_blur_corruption(image, params, rng):
    radius, sigma = params
    return _motion_blur(image.astype(np.float64), radius, sigma, rng.uniform(-45, 45))


@functools.lru_cache(maxsize=None)
def _zoom_blur_operators(size: int, zoom_end: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (row operator, column operator, zoom count) that sum clipped zooms over the zoom grid.

    The grid is np.arange(1, zoom_end, 0.01) exactly as published; its float end point makes it
    include zoom_end at levels 1 and 2 and stop one step short at levels 3..5.
    """
    matrices = np.stack([_zoom_matrix(size, float(zoom)) for zoom in np.arange(1.0, zoom_end, 0.01)])
    rows = matrices.reshape(-1, size)  # (zooms * size, size): every row zoom in one product
    cols = matrices.transpose(0, 2, 1).reshape(-1, size)  # (zooms * size, size): [z * S + w, k] = M_z[k, w]
    return rows, cols, len(matrices)


def _zoom_blur(image, zoom_end, rng):
    unit = _unit(image, np.float32)
    height, width, channels = unit.shape
    row_operator, col_operator, zooms = _zoom_blur_operators(height, zoom_end)
    # sum_z M_z X M_z^T per channel, as two matrix products over the stacked zooms.
    zoomed_rows = (row_operator @ unit.reshape(height, width * channels)).reshape(zooms, height, width, channels)
    stacked = zoomed_rows.transpose(1, 3, 0, 2).reshape(height * channels, zooms * width)
    summed = (stacked @ col_operator).reshape(height, channels, width).transpose(0, 2, 1)
    return (unit + summed) / (zooms + 1) * 255


# Weather and digital (Type0)

def _snow(image, params, rng):
    mean, std, zoom, threshold, radius, sigma, blend = params
    unit = _unit(image, np.float32)
    flakes = _clipped_zoom(rng.normal(mean, std, image.shape[:2]), zoom)
    flakes[flakes < threshold] = 0
    # The published code stores the flakes as an 8-bit PNG (truncating) for ImageMagick's streaks.
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float32)
    streaks = _motion_blur(flakes, radius, sigma, rng.uniform(-135, -45))[..., None] / 255
    grey = cv2.cvtColor(unit, cv2.COLOR_RGB2GRAY)[..., None]
    # Snowy light: lift every pixel towards 1.5 * grey + 0.5, weighted by 1 - blend.
    unit = blend * unit + (1 - blend) * np.maximum(unit, grey * 1.5 + 0.5)
    return (unit + streaks + np.rot90(streaks, k=2)) * 255


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# The published generator draws randint(5), so frost6.jpg is never used; we keep that choice so the
# texture distribution matches CIFAR-10-C.
_FROST_TEXTURES_USED = 5
_FROST_SCALE = 0.2


@functools.lru_cache(maxsize=None)
def _frost_texture(index: int, size: int) -> np.ndarray:
    """Return frost texture ``index`` as RGB float, scaled by 0.2 (more if needed to cover ``size``)."""
    spec = importlib.util.find_spec("imagecorruptions")  # locates the package data without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("frost needs the textures shipped with imagecorruptions-imaug: "
                          "pip install imagecorruptions-imaug")
    path = os.path.join(spec.submodule_search_locations[0], "frost", _FROST_FILES[index])
    texture = cv2.imread(path)
    if texture is None:
        raise FileNotFoundError(f"frost texture {path} is missing or unreadable; reinstall imagecorruptions-imaug")
    # The crop needs at least one spare pixel per axis; only images larger than 32 px can need more.
    scale = max(_FROST_SCALE, (size + 1) / min(texture.shape[:2]))
    texture = cv2.resize(texture, (0, 0), fx=scale, fy=scale)
    texture = cv2.cvtColor(texture, cv2.COLOR_BGR2RGB).astype(np.float64)
    texture.flags.writeable = False
    return texture


def _frost(image, params, rng):
    image_weight, frost_weight = params
    size = image.shape[0]
    texture = _frost_texture(int(rng.integers(_FROST_TEXTURES_USED)), size)
    top = rng.integers(texture.shape[0] - size)
    left = rng.integers(texture.shape[1] - size)
    crop = texture[top:top + size, left:left + size]
    return image_weight * image.astype(np.float64) + frost_weight * crop


def _plasma_fractal(map_size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Return a periodic diamond-square plasma fractal of shape (map_size, map_size) scaled to [0, 1].

    Each pass halves the step: square centres get the mean of their four corners, then edge midpoints
    the mean of their four diamond neighbours (wrapping around), each plus uniform noise. As published,
    the noise of a pass is wibble * U(-wibble, wibble) = wibble^2 * U(-1, 1), with wibble starting at
    100 and divided by ``decay`` per pass, so fine detail falls off as decay^-2 per octave.
    """
    field = np.zeros((map_size, map_size))
    step, wibble = map_size, 100.0
    while step >= 2:
        half = step // 2
        count = map_size // step
        noise = wibble ** 2 * rng.uniform(-1.0, 1.0, size=(3, count, count))
        corners = field[0::step, 0::step]
        around_centre = corners + np.roll(corners, -1, axis=0)
        around_centre = around_centre + np.roll(around_centre, -1, axis=1)
        field[half::step, half::step] = around_centre / 4 + noise[0]
        centres = field[half::step, half::step]
        # Midpoints of horizontal edges: centres above and below, corners left and right.
        around_horizontal = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        field[0::step, half::step] = around_horizontal / 4 + noise[1]
        # Midpoints of vertical edges: centres left and right, corners above and below.
        around_vertical = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        field[half::step, 0::step] = around_vertical / 4 + noise[2]
        step, wibble = half, wibble / decay
    field -= field.min()
    return field / field.max()


def _fog(image, params, rng):
    amount, decay = params
    unit = _unit(image)
    size = image.shape[0]
    brightest = unit.max()
    # 32 px map for CIFAR; other sizes take the next power of two and crop, as ImageNet-C does.
    map_size = max(2, 1 << (size - 1).bit_length())
    fog = _plasma_fractal(map_size, decay, rng)[:size, :size, None]
    return (unit + amount * fog) * brightest / (brightest + amount) * 255


def _brightness(image, value_shift, rng):
    return _adjust_hsv(_unit(image), value_shift=value_shift) * 255


def _saturate(image, params, rng):
    scale, shift = params
    return _adjust_hsv(_unit(image), saturation_scale=scale, saturation_shift=shift) * 255


def _contrast(image, factor, rng):
    unit = _unit(image)
    means = unit.mean(axis=(0, 1), keepdims=True)
    return ((unit - means) * factor + means) * 255


_WATER_RGB = np.array([175, 238, 238]) / 255  # pale turquoise
_MUD_RGB = np.array([63, 42, 20]) / 255  # mud brown
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)


def _spatter(image, params, rng):
    loc, scale, sigma, threshold, intensity, mode = params
    unit = _unit(image, np.float32)
    liquid = _gaussian(rng.normal(loc, scale, image.shape[:2]), sigma)
    liquid[liquid < threshold] = 0
    if mode == 0:
        # Water: shade the drops by an embossed, equalised distance to their edges.
        liquid = np.clip(liquid * 255, 0, 255).astype(np.uint8)  # published code wraps above 255
        distance = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
        distance = np.minimum(distance, 20)
        distance = cv2.equalizeHist(cv2.blur(distance, (3, 3)).astype(np.uint8))
        distance = cv2.blur(cv2.filter2D(distance, cv2.CV_8U, _EMBOSS), (3, 3)).astype(np.float32)
        drops = liquid * distance
        peak = drops.max()
        if peak > 0:
            drops *= intensity / peak
        return (unit + drops[..., None] * _WATER_RGB) * 255
    # Mud: opaque brown where the smoothed drop mask is at least 0.8.
    mud = _gaussian((liquid > threshold).astype(np.float32), intensity)
    mud[mud < 0.8] = 0
    mud = mud[..., None]
    return (unit * (1 - mud) + mud * _MUD_RGB) * 255


def _jpeg(image, quality, rng):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _pixelate(image, factor, rng):
    size = image.shape[0]
    small = int(size * factor)
    pixelated = Image.fromarray(image).resize((small, small), Image.BOX).resize((size, size), Image.BOX)
    return np.asarray(pixelated)


def _elastic(image, params, rng):
    size = image.shape[0]
    alpha, sigma, affine = (value * size for value in params)
    unit = _unit(image, np.float32)
    # Random affine: jitter three points around the centre by up to ``affine`` px.
    centre, reach = size // 2, size // 3
    source = np.float32([[centre + reach, centre + reach], [centre + reach, centre - reach],
                         [centre - reach, centre - reach]])
    target = source + rng.uniform(-affine, affine, size=source.shape).astype(np.float32)
    warped = cv2.warpAffine(unit, cv2.getAffineTransform(source, target), (size, size),
                            borderMode=cv2.BORDER_REFLECT_101)
    if alpha == 0:  # level 1: affine only
        return warped * 255
    # Smooth random displacement field of at most ``alpha`` px per axis.
    col_shift, row_shift = (
        _gaussian(rng.uniform(-1.0, 1.0, (size, size)), sigma, truncate=3.0, border=cv2.BORDER_REFLECT) * alpha
        for _ in range(2)
    )
    grid = np.arange(size, dtype=np.float64)
    elastic = _bilinear_reflect(warped, grid[:, None] + row_shift, grid[None, :] + col_shift)
    return elastic * 255


def _original(image, params, rng):
    return image.copy()


_CORRUPTIONS = {
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "spatter": _spatter,
    "elastic": _elastic,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "saturate": _saturate,
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "original": _original,
}
