"""Sobol low-discrepancy points in numpy, with optional scrambling.

Points are computed directly from their index (Gray-code form), so a sampler can
resume a sequence after a restart from the number of trials alone.
Direction numbers are the first 64 dimensions of Joe and Kuo's ``new-joe-kuo-6.21201``
table; larger dimensions fall back to :class:`scipy.stats.qmc.Sobol` (scipy is a
dependency of JAX, so it is always installed).

Scrambling is linear matrix scrambling plus a random digital shift (Matousek 1998),
which keeps the net property of the sequence.

References:
  Joe, S. and Kuo, F. Y. (2008). Constructing Sobol sequences with better
  two-dimensional projections. SIAM J. Sci. Comput. 30, 2635-2654.
  https://doi.org/10.1137/070709359
"""

from __future__ import annotations

import numpy as np

__all__ = ["sobol_points"]

_BITS = 30
_POLY = (
    1,
    3,
    7,
    11,
    13,
    19,
    25,
    37,
    41,
    47,
    55,
    59,
    61,
    67,
    91,
    97,
    103,
    109,
    115,
    131,
    137,
    143,
    145,
    157,
    167,
    171,
    185,
    191,
    193,
    203,
    211,
    213,
    229,
    239,
    241,
    247,
    253,
    285,
    299,
    301,
    333,
    351,
    355,
    357,
    361,
    369,
    391,
    397,
    425,
    451,
    463,
    487,
    501,
    529,
    539,
    545,
    557,
    563,
    601,
    607,
    617,
    623,
    631,
    637,
)
_VINIT = (
    (1,),
    (1,),
    (1, 3),
    (1, 3, 1),
    (1, 1, 1),
    (1, 1, 3, 3),
    (1, 3, 5, 13),
    (1, 1, 5, 5, 17),
    (1, 1, 5, 5, 5),
    (1, 1, 7, 11, 19),
    (1, 1, 5, 1, 1),
    (1, 1, 1, 3, 11),
    (1, 3, 5, 5, 31),
    (1, 3, 3, 9, 7, 49),
    (1, 1, 1, 15, 21, 21),
    (1, 3, 1, 13, 27, 49),
    (1, 1, 1, 15, 7, 5),
    (1, 3, 1, 15, 13, 25),
    (1, 1, 5, 5, 19, 61),
    (1, 3, 7, 11, 23, 15, 103),
    (1, 3, 7, 13, 13, 15, 69),
    (1, 1, 3, 13, 7, 35, 63),
    (1, 3, 5, 9, 1, 25, 53),
    (1, 3, 1, 13, 9, 35, 107),
    (1, 3, 1, 5, 27, 61, 31),
    (1, 1, 5, 11, 19, 41, 61),
    (1, 3, 5, 3, 3, 13, 69),
    (1, 1, 7, 13, 1, 19, 1),
    (1, 3, 7, 5, 13, 19, 59),
    (1, 1, 3, 9, 25, 29, 41),
    (1, 3, 5, 13, 23, 1, 55),
    (1, 3, 7, 3, 13, 59, 17),
    (1, 3, 1, 3, 5, 53, 69),
    (1, 1, 5, 5, 23, 33, 13),
    (1, 1, 7, 7, 1, 61, 123),
    (1, 1, 7, 9, 13, 61, 49),
    (1, 3, 3, 5, 3, 55, 33),
    (1, 3, 1, 15, 31, 13, 49, 245),
    (1, 3, 5, 15, 31, 59, 63, 97),
    (1, 3, 1, 11, 11, 11, 77, 249),
    (1, 3, 1, 11, 27, 43, 71, 9),
    (1, 1, 7, 15, 21, 11, 81, 45),
    (1, 3, 7, 3, 25, 31, 65, 79),
    (1, 3, 1, 1, 19, 11, 3, 205),
    (1, 1, 5, 9, 19, 21, 29, 157),
    (1, 3, 7, 11, 1, 33, 89, 185),
    (1, 3, 3, 3, 15, 9, 79, 71),
    (1, 3, 7, 11, 15, 39, 119, 27),
    (1, 1, 3, 1, 11, 31, 97, 225),
    (1, 1, 1, 3, 23, 43, 57, 177),
    (1, 3, 7, 7, 17, 17, 37, 71),
    (1, 3, 1, 5, 27, 63, 123, 213),
    (1, 1, 3, 5, 11, 43, 53, 133),
    (1, 3, 5, 5, 29, 17, 47, 173, 479),
    (1, 3, 3, 11, 3, 1, 109, 9, 69),
    (1, 1, 1, 5, 17, 39, 23, 5, 343),
    (1, 3, 1, 5, 25, 15, 31, 103, 499),
    (1, 1, 1, 11, 11, 17, 63, 105, 183),
    (1, 1, 5, 11, 9, 29, 97, 231, 363),
    (1, 1, 5, 15, 19, 45, 41, 7, 383),
    (1, 3, 7, 7, 31, 19, 83, 137, 221),
    (1, 1, 1, 3, 23, 15, 111, 223, 83),
    (1, 1, 5, 13, 31, 15, 55, 25, 161),
    (1, 1, 3, 13, 25, 47, 39, 87, 257),
)


def _direction_numbers(dim: int) -> np.ndarray:
    """Direction numbers ``V[d, j]`` scaled to ``_BITS`` bits, shape ``(dim, _BITS)``."""
    v = np.zeros((dim, _BITS), np.int64)
    v[0] = 1 << np.arange(_BITS - 1, -1, -1)
    for d in range(1, dim):
        poly = _POLY[d]
        s = poly.bit_length() - 1
        m = np.array(_VINIT[d][:s], np.int64)
        v[d, :s] = m << np.arange(_BITS - 1, _BITS - 1 - s, -1)
        for j in range(s, _BITS):
            new = v[d, j - s] ^ (v[d, j - s] >> s)
            for k in range(1, s):
                if (poly >> (s - k)) & 1:
                    new ^= v[d, j - k]
            v[d, j] = new
    return v


def _scramble(v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Linear matrix scrambling of the direction numbers and a digital shift."""
    dim = v.shape[0]
    # bits[d, j, b]: bit b (0 = most significant) of V[d, j].
    shifts = np.arange(_BITS - 1, -1, -1)
    bits = (v[:, :, None] >> shifts[None, None, :]) & 1
    lower = np.tril(rng.integers(0, 2, size=(dim, _BITS, _BITS)), k=-1)
    lower[:, np.arange(_BITS), np.arange(_BITS)] = 1
    new_bits = np.einsum("dbk,djk->djb", lower, bits) % 2
    v2 = np.sum(new_bits << shifts[None, None, :], axis=-1).astype(np.int64)
    shift = rng.integers(0, 1 << _BITS, size=dim, dtype=np.int64)
    return v2, shift


def sobol_points(index: int | np.ndarray, dim: int, *, scramble: bool = False, seed: int | None = None) -> np.ndarray:
    """Sobol points by index.

    Args:
      index: A start index (returns one point) or an array of indices ``(n,)``.
      dim: Number of dimensions.
      scramble: Apply a random linear matrix scramble and digital shift.
      seed: Seed of the scramble (the same seed gives the same sequence).

    Returns:
      Array ``(n, dim)`` (``(1, dim)`` for an int index) in ``[0, 1)``.

    Example:
      >>> sobol_points(np.arange(4), 2)
      array([[0.  , 0.  ],
             [0.5 , 0.5 ],
             [0.75, 0.25],
             [0.25, 0.75]])
    """
    idx = np.atleast_1d(np.asarray(index, np.int64))
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1")
    if np.any(idx < 0) or np.any(idx >= (1 << _BITS)):
        raise ValueError(f"indices must lie in [0, 2**{_BITS}); got min {idx.min()}, max {idx.max()}")
    if dim > len(_POLY):
        from scipy.stats import qmc  # pylint: disable=import-outside-toplevel

        eng = qmc.Sobol(dim, scramble=scramble, seed=seed)
        n = int(idx.max()) + 1
        pts = eng.random(n)
        return pts[idx]
    v = _direction_numbers(dim)
    shift = np.zeros(dim, np.int64)
    if scramble:
        v, shift = _scramble(v, np.random.default_rng(seed))
    gray = idx ^ (idx >> 1)
    gbits = (gray[:, None] >> np.arange(_BITS)[None, :]) & 1  # (n, BITS): bit j of gray code
    x = np.zeros((idx.size, dim), np.int64)
    for j in range(_BITS):
        sel = gbits[:, j].astype(bool)
        if sel.any():
            x[sel] ^= v[None, :, j]
    x ^= shift[None, :]
    return x.astype(np.float64) / float(1 << _BITS)
