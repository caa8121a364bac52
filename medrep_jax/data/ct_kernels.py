"""Paired CT reconstruction kernels simulated from real CT (LTDiff++ kernel pairs).

One noisy parallel-beam sinogram of a real slice is reconstructed twice by filtered
back-projection (FBP) with two filters: B, the standard (sharp) kernel, and A, the
non-standard (smooth) one. The defaults are the pilot of `specs/ltdiff.md`: 180 views,
Poisson I0 = 5e4, B = ramp, A = Hann with its cutoff at 0.5 Nyquist.

Units and geometry:
  * An image is N x N pixels; pixel (i, j) sits at x = j - c, y = i - c, c = (N - 1) / 2.
    Only the inscribed circle (radius N / 2) is imaged: `radon` reads the image as zero
    outside it and `fbp` returns zero there (air, -1000 HU, in `simulate_pair`).
  * `radon(image)` has N detectors one pixel apart (t = k - c) and sums the image along
    each ray with a step of one pixel (bilinear samples): a line integral in units of
    (image value x pixel). `fbp` is its inverse in the same units.
  * HU -> linear attenuation: mu = MU_WATER * (1 + HU / 1000) in 1/mm, clipped at 0
    (`hu_to_mu`). The pixel size is `fov_mm / N` mm (`DEFAULT_FOV_MM`), so
    radon(mu) * pixel_mm is the dimensionless line integral p that attenuates the beam:
    counts ~ Poisson(I0 exp(-p)) (`add_poisson_noise`); I0 counts photons per detector
    bin (width fov_mm / N) and view. p does not depend on N; the image noise does.
"""
# `filter` (the FBP filter's name) shadows the builtin on purpose.
# pylint: disable=redefined-builtin
from __future__ import annotations

import numpy as np

from medrep_jax.data.sources import DataError

# Pilot defaults (specs/ltdiff.md, "A pilot measurement"); config-field friendly.
DEFAULT_NUM_VIEWS = 180
DEFAULT_I0 = 5e4              # incident photons per detector bin and view
DEFAULT_FILTER_A = "hann"     # A: the non-standard, smooth kernel
DEFAULT_CUTOFF_A = 0.5        # fraction of Nyquist
DEFAULT_FILTER_B = "ramp"     # B: the standard, sharp kernel
DEFAULT_CUTOFF_B = 1.0
DEFAULT_FOV_MM = 400.0        # reconstruction field of view across the image width
MU_WATER = 0.0192             # 1/mm, water at about 70 keV effective energy
MIN_COUNT = 1.0               # zero counts are raised to this before -log
FILTERS = ("ramp", "shepp_logan", "cosine", "hann", "hamming")
_CHUNK = 4                    # views per vectorised block (small blocks stay in cache)


def default_angles(num_views: int) -> np.ndarray:
  """`num_views` projection angles evenly spaced over [0, pi), in radians."""
  if int(num_views) < 1:
    raise DataError(f"num_views must be >= 1, got {num_views}")
  return np.arange(int(num_views)) * (np.pi / int(num_views))


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
  """HU -> linear attenuation in 1/mm: mu_water * (1 + HU / 1000), at least 0."""
  return np.maximum(mu_water * (1.0 + np.asarray(hu, np.float32) / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
  """Linear attenuation in 1/mm -> HU: 1000 * (mu / mu_water - 1)."""
  return (1000.0 * (np.asarray(mu) / mu_water - 1.0)).astype(np.float32)


def circle_mask(n: int) -> np.ndarray:
  """(n, n) bool: the pixels inside the inscribed circle (radius n / 2)."""
  x = np.arange(n) - (n - 1) / 2
  return x[:, None] ** 2 + x[None, :] ** 2 <= (n / 2) ** 2


def _square(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] < 2:
    raise DataError(f"{what} must be a square 2-D image (N, N) or (N, N, 1), got shape "
                    f"{image.shape}")
  return image


def radon(image: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Parallel-beam projections of a square image: (num_views, N) line integrals.

  Each ray is sampled one pixel apart by bilinear interpolation (rotate and sum), only
  at points inside the inscribed circle; the image counts as zero outside it.
  """
  image = _square(image, "radon input")
  n, c = image.shape[0], (image.shape[0] - 1) / 2
  padded = np.zeros((n + 2, n + 2), np.float32)
  padded[1:-1, 1:-1] = np.where(circle_mask(n), image, 0)
  flat = padded.ravel()
  t, s = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
  inside = (t ** 2 + s ** 2 <= (n / 2) ** 2).ravel()  # (t, s) in t-major order
  t, s = t.ravel()[inside].astype(np.float32), s.ravel()[inside].astype(np.float32)
  starts = np.searchsorted(np.repeat(np.arange(n), n)[inside], np.arange(n))
  angles = np.asarray(angles, np.float32)
  out = np.empty((len(angles), n), np.float32)
  for a in range(0, len(angles), _CHUNK):
    cos, sin = np.cos(angles[a:a + _CHUNK])[:, None], np.sin(angles[a:a + _CHUNK])[:, None]
    col = t * cos - s * sin + np.float32(c + 1)  # padded coordinates in [0.5, n + 0.5]
    row = t * sin + s * cos + np.float32(c + 1)
    c0, r0 = col.astype(np.int32), row.astype(np.int32)  # floor (positive values)
    col -= c0
    row -= r0
    i00 = r0 * (n + 2) + c0
    top = flat[i00]
    top += (flat[i00 + 1] - top) * col
    bottom = flat[i00 + n + 2]
    bottom += (flat[i00 + n + 3] - bottom) * col
    top += (bottom - top) * row
    out[a:a + _CHUNK] = np.add.reduceat(top, starts, axis=1)
  return out


def filter_response(length: int, filter: str = "ramp", cutoff: float = 1.0) -> np.ndarray:
  """Frequency response (length,) of an FBP filter, in `np.fft.fftfreq(length)` order.

  The ramp is the FFT of the band-limited spatial kernel h(0) = 1/4, h(n) = -1/(pi n)^2
  for odd n, 0 for even n (Kak & Slaney, eq. 3.61), so its DC term is right. It is
  multiplied by a window of x = f / f_c, f_c = cutoff * Nyquist: ramp 1, shepp_logan
  sinc(x / 2), cosine cos(pi x / 2), hann 0.5 + 0.5 cos(pi x), hamming
  0.54 + 0.46 cos(pi x); zero above f_c.
  """
  if filter not in FILTERS:
    raise DataError(f"unknown FBP filter {filter!r}; expected one of {FILTERS}")
  if not 0 < float(cutoff) <= 1:
    raise DataError(f"the filter cutoff is a fraction of Nyquist in (0, 1], got {cutoff}")
  k = np.fft.fftfreq(length) * length  # signed sample offsets 0, 1, ..., -1
  h = np.where(k % 2 == 1, -1.0 / (np.pi * np.where(k == 0, 1, k)) ** 2, 0.0)
  h[0] = 0.25
  ramp = np.fft.fft(h).real
  x = np.abs(np.fft.fftfreq(length)) / (0.5 * float(cutoff))
  window = {"ramp": np.ones_like(x), "shepp_logan": np.sinc(x / 2),
            "cosine": np.cos(np.pi * x / 2), "hann": 0.5 + 0.5 * np.cos(np.pi * x),
            "hamming": 0.54 + 0.46 * np.cos(np.pi * x)}[filter]
  return ramp * np.where(x <= 1, window, 0.0)


def filter_sinogram(sinogram: np.ndarray, filter: str = "ramp",
                    cutoff: float = 1.0) -> np.ndarray:
  """Filters each projection in frequency space, zero-padded to a power of two >= 2N."""
  sinogram = np.asarray(sinogram, np.float32)
  n = sinogram.shape[-1]
  length = max(64, 1 << int(np.ceil(np.log2(2 * n))))
  spectrum = np.fft.rfft(sinogram, n=length, axis=-1)
  response = filter_response(length, filter, cutoff)[:length // 2 + 1]
  return np.fft.irfft(spectrum * response, n=length, axis=-1)[..., :n].astype(np.float32)


def backproject(filtered: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Back-projects (..., num_views, N) filtered projections to (..., N, N) images.

  Linear interpolation on the detector, scaled by pi / num_views; pixels outside the
  inscribed circle are 0. Leading axes (several filters) share the interpolation.
  """
  filtered = np.asarray(filtered, np.float32)
  views, n = filtered.shape[-2:]
  angles = np.asarray(angles, np.float32)
  if len(angles) != views:
    raise DataError(f"the sinogram has {views} views but {len(angles)} angles were given")
  lead = filtered.shape[:-2]
  q = filtered.reshape((-1, views, n))
  c = (n - 1) / 2
  inside = circle_mask(n)
  y, x = (np.nonzero(inside)[k].astype(np.float32) - c for k in (0, 1))
  q = np.pad(q, ((0, 0), (0, 0), (1, 1)))  # zero beyond the detector ends
  acc = np.zeros((q.shape[0], x.size), np.float32)
  for a in range(0, views, _CHUNK):
    cos, sin = np.cos(angles[a:a + _CHUNK])[:, None], np.sin(angles[a:a + _CHUNK])[:, None]
    pos = x * cos + y * sin + np.float32(c + 1)  # padded detector position in [0.5, n + 0.5]
    i0 = pos.astype(np.int32)
    pos -= i0
    i0 += (np.arange(i0.shape[0], dtype=np.int32) * (n + 2))[:, None]  # flattened block
    for k in range(q.shape[0]):
      block = q[k, a:a + _CHUNK].ravel()
      left = block[i0]
      left += (block[i0 + 1] - left) * pos
      acc[k] += left.sum(0)
  out = np.zeros((q.shape[0], n, n), np.float32)
  out[:, inside] = acc * np.float32(np.pi / views)
  return out.reshape(lead + (n, n))


def fbp(sinogram: np.ndarray, angles: np.ndarray, filter: str = "ramp",
        cutoff: float = 1.0) -> np.ndarray:
  """Filtered back-projection of a (num_views, N) sinogram to an (N, N) image.

  A noise-free ramp FBP of `radon(image, angles)` returns `image` inside the inscribed
  circle (with enough views, about pi N / 2).
  """
  return backproject(filter_sinogram(sinogram, filter, cutoff), angles)


def add_poisson_noise(sinogram: np.ndarray, i0: float, rng: np.random.Generator, *,
                      scale: float = 1.0, min_count: float = MIN_COUNT) -> np.ndarray:
  """Transmission noise: counts ~ Poisson(i0 exp(-p * scale)), p' = -log(counts / i0) / scale.

  Args:
    sinogram: line integrals p; p * scale must be dimensionless (for p = radon of mu in
      1/mm, scale is the pixel size in mm).
    i0: incident photons per detector bin and view (larger = less noise).
    rng: the numpy generator that draws the counts.
    scale: see `sinogram`.
    min_count: zero counts (photon starvation) are raised to this before the log.

  Returns:
    The noisy line integrals, float32, in the units of `sinogram`.
  """
  if not float(i0) > 0:
    raise DataError(f"i0 (incident photons) must be > 0, got {i0}")
  expected = float(i0) * np.exp(-np.asarray(sinogram, np.float64) * scale)
  counts = np.maximum(rng.poisson(expected), min_count)
  return (-np.log(counts / float(i0)) / scale).astype(np.float32)


def simulate_pair(hu_slice: np.ndarray, *, num_views: int = DEFAULT_NUM_VIEWS,
                  i0: float | None = DEFAULT_I0, filter_a: str = DEFAULT_FILTER_A,
                  cutoff_a: float = DEFAULT_CUTOFF_A, filter_b: str = DEFAULT_FILTER_B,
                  cutoff_b: float = DEFAULT_CUTOFF_B, fov_mm: float = DEFAULT_FOV_MM,
                  mu_water: float = MU_WATER,
                  rng: np.random.Generator | int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(A, B) in HU, float32 (N, N): one noisy sinogram of `hu_slice`, two FBP filters.

  Args:
    hu_slice: (N, N) or (N, N, 1) CT slice in HU (simulated at its own size).
    num_views: projections over [0, pi).
    i0: incident photons per detector bin and view; None or 0 = no noise.
    filter_a, cutoff_a: the non-standard (smooth) kernel A.
    filter_b, cutoff_b: the standard (sharp) kernel B.
    fov_mm: the width of the image in mm (pixel size fov_mm / N).
    mu_water: attenuation of water in 1/mm.
    rng: a numpy Generator or seed; equal seeds give equal pairs.

  Outside the inscribed circle both images are -1000 HU (air).
  """
  hu = _square(hu_slice, "simulate_pair hu_slice")
  for f, cut in ((filter_a, cutoff_a), (filter_b, cutoff_b)):
    filter_response(8, f, cut)  # checks the names and cutoffs before the work
  pixel_mm = float(fov_mm) / hu.shape[0]
  angles = default_angles(num_views)
  sino = radon(hu_to_mu(hu, mu_water), angles)
  if i0:
    sino = add_poisson_noise(sino, i0, np.random.default_rng(rng), scale=pixel_mm)
  filtered = np.stack([filter_sinogram(sino, filter_a, cutoff_a),
                       filter_sinogram(sino, filter_b, cutoff_b)])
  a, b = mu_to_hu(backproject(filtered, angles), mu_water)
  return a, b
