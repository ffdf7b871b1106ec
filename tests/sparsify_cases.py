"""Inputs that stress percentile sparsification, and the exact CSR
comparison, shared by the kernel tests of every tier (test_sparsify.py and
tests/gpu)."""
import functools

import numpy as np

TINY = np.float32(2.0**-149)  # the smallest denormal


def _random(rng, rows, sizes):
    return rng.standard_normal((rows, sum(sizes))).astype(np.float32)


def _ties(rng, rows, sizes):
    """Few distinct magnitudes: many entries tie with the threshold."""
    pool = np.array([0, 1, -1, 2, -2, 3], dtype=np.float32)
    return rng.choice(pool, size=(rows, sum(sizes)))


def _zero_and_constant(rng, rows, sizes):
    """Segment 0 all zero, segment 1 of constant magnitude with mixed signs,
    segment 2 random."""
    g = _random(rng, rows, sizes)
    g[:, :sizes[0]] = 0
    signs = rng.choice(np.array([-1, 1], dtype=np.float32),
                       size=(rows, sizes[1]))
    g[:, sizes[0]:sizes[0] + sizes[1]] = np.float32(0.375) * signs
    return g


def _denormals(rng, rows, sizes):
    """Denormals mixed with zeros and the smallest normals."""
    k = rng.integers(0, 40, size=(rows, sum(sizes))).astype(np.float32)
    g = k * TINY
    g[:, ::7] = np.float32(np.finfo(np.float32).tiny)
    return g * rng.choice(np.array([-1, 1], dtype=np.float32), size=g.shape)


def _low_bits(rng, rows, sizes):
    """Magnitudes differing only in the lowest mantissa bits (the radix
    select must resolve them in its last digit), some in bits 10..19."""
    bits = (np.uint32(0x3F800000) + rng.integers(0, 1 << 10, size=(rows, sum(sizes)))
            .astype(np.uint32))
    bits[:, 1::3] += np.uint32(1 << 12)
    return bits.view(np.float32)


def _extreme_range(rng, rows, sizes):
    """Magnitudes from denormal to the largest float32."""
    exponent = rng.integers(-149, 128, size=(rows, sum(sizes)))
    g = np.ldexp(rng.uniform(0.5, 1.0, size=exponent.shape), exponent)
    g = np.minimum(g, np.finfo(np.float32).max).astype(np.float32)
    return g * rng.choice(np.array([-1, 1], dtype=np.float32), size=g.shape)


def _adjacent(rng, rows, sizes):
    """Two magnitudes one ulp apart per segment: with q = 70 the float64
    threshold keeps the larger one, a float32 threshold would not."""
    pair = np.array([1.0, np.nextafter(np.float32(1), np.float32(2))],
                    dtype=np.float32)
    return np.tile(pair, (rows, sum(sizes) // 2))


def _pair(rng, rows, sizes, above_fraction):
    """Per segment of size m: magnitudes a < b one ulp apart,
    round(above_fraction * (m - 1)) magnitudes in (2b, 4b), the rest below
    a / 2.  The base b is near 1 in row 0, near
    5 in row 1, the smallest normal (a the largest denormal) in row 2, and
    the largest float32 (above = 0) or 2^100 in row 3.  A q that puts the
    percentile within ~2^-30 of b's rank rounds the float64 threshold to b,
    which then does not survive; a q farther off keeps b."""
    tops = [1.0, 5.0, np.finfo(np.float32).tiny,
            np.finfo(np.float32).max if above_fraction == 0 else 2.0**100]
    g = np.empty((rows, sum(sizes)), dtype=np.float32)
    start = 0
    for size in sizes:
        above = round(above_fraction * (size - 1))
        for r in range(rows):
            b = np.float32(tops[r % 4])
            a = np.nextafter(b, np.float32(0))
            segment = np.concatenate([
                rng.uniform(0, 0.5, size - 2 - above) * a, [a, b],
                rng.uniform(2, 4, above) * b]).astype(np.float32)
            signs = rng.choice(np.array([-1, 1], dtype=np.float32), size)
            g[r, start:start + size] = rng.permutation(segment) * signs
        start += size
    return g


def hard_cases(scale=1):
    """(name, g, sizes, q) tuples; ``scale`` multiplies the segment lengths
    (1 keeps everything small enough for the CPU emulation)."""
    rng = np.random.default_rng(20240607)
    s = scale
    cases = [
        ('random', _random(rng, 5, [1, 2, 3, 17 * s, 100 * s]), [1, 2, 3, 17 * s, 100 * s], 85.0),
        ('ties', _ties(rng, 4, [9, 40 * s, 333 * s]), [9, 40 * s, 333 * s], 85.0),
        ('ties-q50', _ties(rng, 4, [10, 41 * s]), [10, 41 * s], 50.0),
        ('zero-constant', _zero_and_constant(rng, 3, [30 * s, 50 * s, 20 * s]),
         [30 * s, 50 * s, 20 * s], 85.0),
        ('denormals', _denormals(rng, 3, [5, 60 * s, 200 * s]), [5, 60 * s, 200 * s], 85.0),
        ('low-bits', _low_bits(rng, 3, [300 * s, 77 * s]), [300 * s, 77 * s], 85.0),
        ('extreme-range', _extreme_range(rng, 3, [64 * s, 190 * s]), [64 * s, 190 * s], 85.0),
        ('adjacent-q70', _adjacent(rng, 2, [2, 2, 2]), [2, 2, 2], 70.0),
        ('length-1', _random(rng, 4, [1, 1, 1]), [1, 1, 1], 85.0),
        ('top-pair-rounds-to-b', _pair(rng, 4, [2, 7, 40], 0), [2, 7, 40], 100 - 1e-9),
        ('top-pair-below-b', _pair(rng, 4, [2, 7, 40], 0), [2, 7, 40], 99.99),
        ('middle-pair-rounds-to-b', _pair(rng, 4, [41, 401, 4001], 0.475),
         [41, 401, 4001], 52.5 - 1e-11),
        ('middle-pair-below-b', _pair(rng, 4, [41, 401, 4001], 0.475),
         [41, 401, 4001], 52.5 - 1e-6),
    ]
    for q in (1e-9, 0.001, 99.999, 100 - 1e-12):
        cases.append((f'q={q!r}', _random(rng, 3, [1, 5, 70 * s]), [1, 5, 70 * s], q))
    return cases


@functools.lru_cache(maxsize=None)
def _hard_case_table(scale):
    return {name: (g, sizes, q) for name, g, sizes, q in hard_cases(scale)}


def hard_case(name, scale=1):
    """``(g, sizes, q)`` of the hard case ``name`` at ``scale`` (built once
    per scale; do not modify g)."""
    return _hard_case_table(scale)[name]


HARD_CASE_NAMES = list(_hard_case_table(1))
NONFINITE = [np.nan, np.inf, -np.inf]


def with_nonfinite(xp, value, shape=(3, 40), at=(2, 33)):
    """A float32 ``xp`` array of ones with ``value`` at ``at``."""
    g = xp.ones(shape, dtype=xp.float32)
    g[at] = value
    return g


def assert_csr_identical(actual, expected):
    """Same shape, indptr, indices and dtypes; data equal bit for bit."""
    assert tuple(actual.shape) == tuple(expected.shape)
    for name in ('indptr', 'indices', 'data'):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        assert a.shape == e.shape, (name, a.shape, e.shape)
    np.testing.assert_array_equal(actual.indptr, expected.indptr)
    np.testing.assert_array_equal(actual.indices, expected.indices)
    np.testing.assert_array_equal(actual.data.view(np.uint32),
                                  expected.data.view(np.uint32))


def kept_oracle(y, q, block_sizes):
    """Plain-NumPy per-layer sparsification of dense rows: in each row and
    each block of ``block_sizes`` columns keep the entries with ``|y| >
    np.percentile(|y|, q)``, zero the rest. ``y``: (rows, sum(block_sizes));
    returns an array of its shape and dtype."""
    kept = np.zeros_like(y)
    for row in range(len(y)):
        start = 0
        for size in block_sizes:
            part = y[row, start:start + size]
            keep = np.abs(part) > np.percentile(np.abs(part), q)
            kept[row, start:start + size] = np.where(keep, part, 0)
            start += size
    return kept
