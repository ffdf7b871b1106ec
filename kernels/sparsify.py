"""Per-sample, per-layer sparsification of tangent features into CSR.

:func:`percentile_sparsify` is docs/method.rst#per-layer-sparsification: in every row of ``g`` and
every segment (layer block) keep the entries whose magnitude exceeds the
segment's ``q``-th percentile. :func:`gather_fixed` is the paper's variant
with fixed per-label coordinate sets, built by :func:`fixed_index_sets`.
:func:`check_q` is the one check of a percentile ``q`` (here and in every
stage that takes one).

The percentile, precisely.  For a segment ``x`` of ``m`` float32 entries the
threshold is ``numpy.percentile(abs(x).astype(numpy.float64), q)`` (method
'linear'): with ``v = (m - 1) * (q / 100)`` in float64, ``lo = floor(v)``,
``hi = lo + 1`` (both ``m - 1`` once ``v >= m - 1``) and ``gamma = v - lo``,
and ``a``, ``b`` the ``lo``-th and ``hi``-th smallest magnitudes as float64::

    threshold = b - (b - a) * (1 - gamma)   if gamma >= 0.5
                a + (b - a) * gamma         otherwise

each operation rounded to float64 (NumPy's ``_lerp``). An entry is kept iff
``abs(x_j) > threshold`` compared in float64 (exact for float32 values).
So zeros never survive, and a constant segment keeps nothing.

Why float64: NumPy >= 2 evaluates ``numpy.percentile`` of a *float32* array
in float32, which rounds the threshold and can drop an entry just above it
(two magnitudes one ulp apart, q = 70: the float32 threshold equals the
larger one). The float64 threshold is the exact interpolation up to one
float64 rounding, the same under NumPy 1.26 and 2.x, and what the CUDA
kernel reproduces bit for bit.

Both implementations compare against a float32 *bound* instead: with
``a <= b`` the two order statistics, the threshold lies in [a, b] and no
magnitude lies strictly between them, so ``|x| > threshold`` iff
``|x| > (a if threshold < b else b)``. The NumPy path (the reference and the
CPU implementation: vectorised over rows, one ``numpy.partition`` per
segment) is tested against ``numpy.percentile`` itself; CuPy input runs the
CUDA kernels of ``sparsify.cu`` through :func:`sparsify_launches`,
tested against the NumPy path bit for bit (on the CPU through
tests/cuda_emulation, and on a GPU). The CUDA path never waits for the
device until its end (:func:`percentile_sparsify` says exactly when the
host waits): it allocates the output at a bound the host knows
(:func:`kept_capacity`) and reads the kept count once, at the end.
"""
import contextlib
import math
import numbers

import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels._cuda import device_constants, launcher
from gradnet_cupy.kernels.csr import CSR, check_csr

CUDA_SOURCE = 'sparsify.cu'
GPU_BLOCK = 512  # threads per block of both sparsify kernels on the GPU
ITEMS = 16             # entries per thread of a chunk (sparsify.cu)
SAMPLE_KEYS = 8192     # shared-memory keys: a staged segment or sample
SAMPLE_RUN = 32        # consecutive entries per sample run
SAMPLE_MARGIN = 3.0    # standard deviations of a sample quantile
INFO_COLUMNS = 8       # columns of the per-segment plan (segment_plan)
KERNELS = ('sparsify_sample', 'sparsify_split', 'sparsify_resolve',
           'sparsify_fallback', 'sparsify_compact')
# bytes of global loads each thread keeps in flight (independent loads),
# per kernel, for the roofline model of bench/roofline.py
IN_FLIGHT_BYTES = {'sparsify_sample': 4, 'sparsify_split': 4 * ITEMS,
                   'sparsify_resolve': 4, 'sparsify_fallback': 4,
                   'sparsify_compact': 4 * ITEMS}
MAX_COLUMNS = 2**31 - 1  # CSR indices are int32
CHUNK_BYTES = 16 << 20  # the NumPy path works through g in blocks of rows
NONFINITE_MESSAGE = ('g contains NaN or Inf: sparsification needs finite '
                     'gradients')


def percentile_sparsify(g, sizes, q=85.0, stream=None):
    """Keep, per row and segment, the entries above the ``q``-th percentile
    of the segment's magnitudes (see the module docstring for the exact
    arithmetic).

    g: (rows, n) float32, NumPy or CuPy. Other dtypes are refused rather
        than converted (rounding float64 to float32 changes which entries
        survive): convert explicitly with ``g.astype(numpy.float32)``.
    sizes: host sequence of positive ints summing to n, the segment lengths.
    q: percentile, 0 < q < 100 (taken as a Python float).
    stream: CuPy stream for the GPU path (default: the current stream).
        Ignored for NumPy input.

    Returns a :class:`CSR` of shape (rows, n) on g's device: ``indptr``
    int64 (rows + 1,), ``indices`` int32 ascending within each row, ``data``
    float32 (the signed values of g). CPU and GPU results are identical.
    Raises GradnetError for bad arguments and for NaN or Inf in g.

    Host waits (CuPy input). Every device operation is queued on
    ``stream``; the host waits for it exactly once, at the end, to read the
    kept count and the NaN/Inf flag in one copy (:meth:`PendingCSR.result`).
    The first call with given ``sizes`` and ``q`` on a device also waits
    once for the upload of the per-segment plan (:func:`segment_plan`,
    ``_cuda.device_constants``), before any kernel. :func:`percentile_sparsify_async` is the same without the final
    wait (for a CUDA graph capture).
    """
    pending = percentile_sparsify_async(g, sizes, q, stream)
    return pending.result()


def percentile_sparsify_async(g, sizes, q=85.0, stream=None):
    """:func:`percentile_sparsify` up to its final host wait: queues the
    kernels on ``stream`` (default: the current one) and returns a
    :class:`PendingCSR`, whose :meth:`~PendingCSR.result` waits and returns
    the CSR (or raises the NaN/Inf error). Nothing here waits for the
    device, except the first call with given ``sizes`` and ``q`` on a
    device (the upload of the plan), so after such a warm-up call it can be
    captured in a CUDA graph; the graph's replays rewrite the arrays of the
    PendingCSR captured with it. NumPy input: computed at once.
    """
    xp = _check_g(g)
    starts = segment_offsets(sizes, g.shape[1])
    quantile = check_q(q) / 100.0
    if xp is np:
        result = _sparsify_numpy(g, starts, quantile)
        return PendingCSR(result.indptr, result.indices, result.data,
                          result.shape, np.zeros(1, dtype=np.int32))
    with stream if stream is not None else contextlib.nullcontext():
        return sparsify_launches(g, starts, quantile, launcher(CUDA_SOURCE),
                                 xp, GPU_BLOCK)


class PendingCSR:
    """The output of :func:`percentile_sparsify_async` before the host has
    looked at it: ``indptr`` int64 (rows + 1,) (final), ``indices`` int32 and
    ``data`` float32 of :func:`kept_capacity` entries (the first
    ``indptr[-1]`` of them are the CSR's), ``shape`` (rows, n), ``bad``
    int32 (1,) (nonzero when g had NaN or Inf), all on g's device, and
    ``stream``, the CuPy stream the kernels were queued on (None for NumPy).
    """

    def __init__(self, indptr, indices, data, shape, bad, stream=None):
        self.indptr, self.indices, self.data = indptr, indices, data
        self.shape, self.bad, self.stream = shape, bad, stream

    def result(self, stream=None):
        """The :class:`CSR` (``indices`` and ``data`` views of the first nnz
        entries). Reads nnz and the NaN/Inf flag in one copy on ``stream``
        (default: the stream of the kernels), the one host wait; raises
        GradnetError when g had NaN or Inf."""
        xp = get_array_module(self.indptr)
        stream = stream if stream is not None else self.stream
        with stream if stream is not None else contextlib.nullcontext():
            nnz, flag = to_numpy(xp.stack(
                (self.indptr[-1], self.bad[0].astype(np.int64)))).tolist()
        if flag:
            raise GradnetError(NONFINITE_MESSAGE)
        if not 0 <= nnz <= self.indices.shape[0]:
            raise RuntimeError(f'percentile_select counted {nnz} entries to '
                               f'keep, over the bound '
                               f'{self.indices.shape[0]}: a kernel fault')
        return CSR(self.indptr, self.indices[:nnz], self.data[:nnz],
                   self.shape)


def check_q(q):
    """``q`` as a float after checking it is a real number with
    ``0 < q < 100`` (a sparsification percentile); GradnetError otherwise.
    The one check of ``q`` for every stage that takes one."""
    if isinstance(q, (bool, np.bool_)) or not isinstance(q, numbers.Real):
        raise GradnetError(f'the sparsification percentile q must be a '
                           f'number in (0, 100), got {q!r}')
    q = float(q)
    if not 0.0 < q < 100.0:
        raise GradnetError(f'the sparsification percentile q must lie '
                           f'strictly between 0 and 100, got {q}')
    return q


def segment_offsets(sizes, n):
    """(n_seg + 1,) int64 column offsets of consecutive segments.

    sizes: host sequence of n_seg >= 1 positive ints that sum to n.
    """
    try:
        lengths = np.asarray(sizes)
    except TypeError as error:  # e.g. a CuPy array
        raise GradnetError(f'sizes must be a host sequence of ints: {error}')
    if (lengths.ndim != 1 or lengths.size == 0
            or lengths.dtype.kind not in 'iu'):
        raise GradnetError(
            f'sizes must be a non-empty 1-D sequence of ints, got {sizes!r}')
    if (lengths <= 0).any():
        raise GradnetError(
            f'sizes must be positive, got {int(lengths.min())} among them')
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != n:
        raise GradnetError(
            f'sizes sum to {int(offsets[-1])}, but g has {n} columns')
    if n > MAX_COLUMNS:
        raise GradnetError(f'g has {n} columns; at most {MAX_COLUMNS} '
                           'fit the int32 CSR indices')
    return offsets


def percentile_ranks(m, quantile):
    """``(lo, hi, gamma)``: the 0-based ranks of the two order statistics
    that NumPy's linear percentile of ``m`` values interpolates between, and
    the interpolation weight (float64). ``quantile`` is q / 100."""
    virtual_index = (m - 1) * quantile
    if virtual_index >= m - 1:
        return m - 1, m - 1, 0.0
    lo = int(virtual_index)
    return lo, lo + 1, virtual_index - lo


def kept_capacity(starts, quantile):
    """The most entries one row can keep: the sum over the segments of
    ``m - 1 - lo``, with ``lo`` from :func:`percentile_ranks` of the
    segment's length ``m``. starts: (n_seg + 1,) segment offsets; quantile
    = q / 100.

    Why it is a bound. Let a <= b be the lo-th and hi-th smallest
    magnitudes (ranks from 0). An entry is kept iff its magnitude exceeds
    the bound (module docstring), which is a or b, so at least a. The lo + 1
    smallest magnitudes (ranks 0 .. lo) are all <= a, so none of them is
    kept, and at most m - (lo + 1) entries of the segment are. The kernels
    count on float32 bit patterns as integers (sparsify.cu) and rank them
    the same way, NaN and Inf included, and compute lo by the same float64
    product and truncation, so the bound holds for their counts too, on any
    input. It is reached when the magnitudes above a are distinct from a;
    ties at a keep fewer. When (m - 1) * quantile >= m - 1, lo = m - 1 and
    the segment keeps nothing.
    """
    lengths = np.diff(np.asarray(starts, dtype=np.int64)).tolist()
    return sum(m - 1 - percentile_ranks(m, quantile)[0] for m in lengths)


def interpolate(a, b, gamma):
    """NumPy's ``_lerp(a, b, gamma)``: float64 arrays ``a <= b``, float
    ``gamma`` in [0, 1); the result lies in [a, b]."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1.0 - gamma)
    return a + diff * gamma


def _sparsify_numpy(g, starts, quantile):
    """The NumPy implementation. g: (rows, n) float32 NumPy; starts from
    :func:`segment_offsets`; quantile = q / 100. Works through blocks of
    about CHUNK_BYTES of g, so temporaries stay small and cache-warm."""
    rows, n = g.shape
    step = max(1, CHUNK_BYTES // (4 * n))
    parts = [_sparsify_rows(g[first:first + step], starts, quantile)
             for first in range(0, rows, step)]
    indptr = np.zeros(rows + 1, dtype=np.int64)
    if not parts:
        return CSR(indptr, np.empty(0, np.int32), np.empty(0, np.float32),
                   (rows, n))
    np.cumsum(np.concatenate([np.diff(p.indptr) for p in parts]),
              out=indptr[1:])
    return CSR(indptr, np.concatenate([p.indices for p in parts]),
               np.concatenate([p.data for p in parts]), (rows, n))


def _sparsify_rows(g, starts, quantile):
    """_sparsify_numpy of a block of rows (rows >= 1), all at once."""
    rows, n = g.shape
    keep = np.empty((rows, n), dtype=bool)
    scratch = np.empty(rows * int(np.diff(starts).max()), dtype=np.float32)
    for start, stop in zip(starts[:-1].tolist(), starts[1:].tolist()):
        segment = g[:, start:stop]
        magnitude = np.abs(segment, out=scratch[:segment.size].reshape(
            segment.shape))
        bound = _keep_above(magnitude, quantile)  # reorders magnitude
        np.greater(np.abs(segment, out=magnitude), bound[:, None],
                   out=keep[:, start:stop])
    flat = np.flatnonzero(keep)  # row-major: ascending columns per row
    indptr = np.zeros(rows + 1, dtype=np.int64)
    indptr[1:] = np.searchsorted(flat, np.arange(1, rows + 1) * n)
    data = np.take(g, flat)
    columns = np.remainder(flat, n, out=flat).astype(np.int32)
    return CSR(indptr, columns, data, (rows, n))


def _keep_above(magnitude, quantile):
    """(rows,) float32 bounds (module docstring): |x| > threshold iff
    |x| > bound, for the rows of magnitude (rows, m) float32 = |segment|,
    which it reorders in place."""
    if not np.isfinite(magnitude.max(initial=0)):
        raise GradnetError(NONFINITE_MESSAGE)
    lo, hi, gamma = percentile_ranks(magnitude.shape[1], quantile)
    magnitude.partition(lo, axis=1)  # hi's value: the least one after lo
    a = magnitude[:, lo]
    b = magnitude[:, hi:].min(axis=1) if hi > lo else a
    threshold = interpolate(a.astype(np.float64), b.astype(np.float64), gamma)
    return np.where(threshold < b, a, b)


def segment_plan(starts, quantile, block, sample_keys=SAMPLE_KEYS):
    """The per-segment plan the kernels of ``sparsify.cu`` read, built on
    the host from the segment offsets ``starts`` ((n_seg + 1,) int64),
    ``quantile`` = q / 100 and the threads per ``block``.

    Returns ``(info, gamma, chunk_seg)``: ``info`` int64 (n_seg + 1,
    INFO_COLUMNS), row s = [first column, lo, hi (:func:`percentile_ranks`),
    sample length (= the segment length when it is at most ``sample_keys``:
    staged whole), sample rank of the lower and of the upper candidate key
    (:func:`sample_ranks`), first chunk of the segment in a row (chunks of
    ``block * ITEMS`` entries), offset of its candidate region in a row],
    the last row holding the ends (n, the most candidates staged in shared
    memory (``sample_keys``), chunks per row, candidate entries per row in
    columns 0, 1, 6 and 7); ``gamma`` float64 (n_seg,); ``chunk_seg``
    int32 (chunks per row,): the segment of each chunk of a row.
    """
    if not 2 * SAMPLE_RUN <= sample_keys <= SAMPLE_KEYS:
        raise ValueError(f'sample_keys must lie in [{2 * SAMPLE_RUN}, '
                         f'{SAMPLE_KEYS}], got {sample_keys}')
    lengths = np.diff(np.asarray(starts, dtype=np.int64)).tolist()
    chunk = block * ITEMS
    info = np.zeros((len(lengths) + 1, INFO_COLUMNS), dtype=np.int64)
    gamma = np.zeros(len(lengths), dtype=np.float64)
    chunks = [-(-m // chunk) for m in lengths]
    first_chunk = first_candidate = 0
    for s, m in enumerate(lengths):
        lo, hi, gamma[s] = percentile_ranks(m, quantile)
        sample, sample_lo, sample_hi, capacity = sample_ranks(
            m, lo, hi, quantile, sample_keys)
        info[s] = (starts[s], lo, hi, sample, sample_lo, sample_hi,
                   first_chunk, first_candidate)
        first_chunk += chunks[s]
        first_candidate += capacity
    info[-1, [0, 1, 6, 7]] = (starts[-1], sample_keys, first_chunk,
                              first_candidate)
    chunk_seg = np.repeat(np.arange(len(lengths)), chunks).astype(np.int32)
    return info, gamma, chunk_seg


def sample_ranks(m, lo, hi, quantile, sample_keys=SAMPLE_KEYS):
    """``(sample, sample_lo, sample_hi, capacity)`` of a segment of ``m``
    entries whose target ranks are ``lo <= hi``.

    ``m <= sample_keys``: the segment is staged whole (``sample = m``, no
    candidates). Otherwise ``sample`` entries (runs of SAMPLE_RUN, a multiple
    of it, about ``(3 m)^(2/3)``: the sample's cost and the candidates'
    balance) and the sample ranks of the keys that bracket the targets:
    the ranks the targets would have in the sample, widened by
    ``SAMPLE_MARGIN`` standard deviations of a sample quantile plus one
    run (-1 / ``sample``: no bracket on that side). ``capacity``: the
    candidate entries the task may keep (twice those expected, at least
    m / 8, plus 64); more, or targets outside the bracket, send the task to
    the exact fallback. Only speed depends on these choices, never the
    result.
    """
    if m <= sample_keys:
        return m, 0, 0, 0
    sample = min(sample_keys // SAMPLE_RUN,
                 max(2, int((3.0 * m) ** (2 / 3)) // SAMPLE_RUN)) * SAMPLE_RUN
    margin = (math.ceil(SAMPLE_MARGIN * math.sqrt(
        sample * quantile * (1.0 - quantile))) + SAMPLE_RUN)
    sample_lo = max(-1, lo * sample // m - margin)
    sample_hi = min(sample, -(-hi * sample // m) + margin)
    expected = (sample_hi - sample_lo + 1) * m // sample
    return sample, sample_lo, sample_hi, max(2 * expected, m // 8) + 64


def block_elements(kernel, starts, block=GPU_BLOCK):
    """Entries of g the busiest thread block of ``kernel`` reads (for the
    roofline model of bench/roofline.py): a chunk for the kernels with one
    block per chunk; for those with one block per task, a staged segment
    (``sparsify_sample``), nothing of g (``sparsify_resolve``) or, for the
    rare fallback, the longest segment."""
    longest = int(np.diff(starts).max())
    return {'sparsify_sample': min(longest, SAMPLE_KEYS),
            'sparsify_split': block * ITEMS, 'sparsify_compact': block * ITEMS,
            'sparsify_resolve': 0, 'sparsify_fallback': longest}[kernel]


def sparsify_launch_sequence(g, starts, quantile, launch, xp, block,
                             sample_keys=SAMPLE_KEYS):
    """The host side of the CUDA path, shared by the CuPy path and the CPU
    emulation (tests/cuda_emulation): :func:`sparsify_launches`, then its
    one host wait. Returns the CSR (``xp`` arrays); GradnetError when g has
    NaN or Inf."""
    return sparsify_launches(g, starts, quantile, launch, xp, block,
                             sample_keys).result()


def sparsify_launches(g, starts, quantile, launch, xp, block,
                      sample_keys=SAMPLE_KEYS):
    """Queues the kernels of the CUDA path on the current stream, without a
    host wait (but for the first upload of the plan to a device, see
    ``_cuda.device_constants``).

    g: (rows, n) float32 array of module ``xp``; starts: (n_seg + 1,) int64
    host segment offsets; quantile = q / 100 (checked);
    launch(name, grid, block, shared_mem, args) runs a kernel of
    ``sparsify.cu``; block: threads per block, a power of two <= 1024;
    sample_keys: the longest segment staged whole, and the largest sample
    (:func:`segment_plan`; the tests lower it to reach the sampled path
    with small inputs). The output arrays are allocated at the bound
    :func:`kept_capacity` per row, which the host knows without looking at
    g. Returns a :class:`PendingCSR`.
    """
    if block & (block - 1) or not 0 < block <= 1024:
        raise ValueError(f'block must be a power of two <= 1024, got {block}')
    g = xp.ascontiguousarray(g)
    starts = to_numpy(starts).astype(np.int64)
    rows, n = g.shape
    n_seg = starts.shape[0] - 1
    tasks = rows * n_seg  # one block per (row, segment), row-major
    capacity = rows * kept_capacity(starts, quantile)
    indptr = xp.zeros(rows + 1, dtype=xp.int64)
    indices = xp.empty(capacity, dtype=xp.int32)
    data = xp.empty(capacity, dtype=xp.float32)
    bad = xp.zeros(1, dtype=xp.int32)
    stream = None if xp is np else xp.cuda.get_current_stream()
    if tasks:
        info, gamma, chunk_seg = segment_plan(starts, quantile, block,
                                              sample_keys)
        chunks_per_row, candidates = int(info[-1, 6]), int(info[-1, 7])
        chunks = rows * chunks_per_row
        info, gamma, chunk_seg = device_constants((info, gamma, chunk_seg),
                                                  xp)
        plan = (info, gamma, np.int32(n_seg))
        source = (g, np.int64(n)) + plan
        status = xp.empty(tasks, dtype=xp.int32)
        lo_key, hi_key, keep_above = (xp.empty(tasks, dtype=xp.uint32)
                                      for _ in range(3))
        chunk_kept = xp.empty(chunks, dtype=xp.int64)
        launch('sparsify_sample', (tasks,), (block,), 0,
               source + (lo_key, hi_key, status, keep_above, chunk_kept, bad))
        if candidates:  # some segment is sampled
            below, cand_n = (xp.zeros(tasks, dtype=xp.uint32) for _ in range(2))
            cand = xp.empty(rows * candidates, dtype=xp.uint32)
            cand_start, cand_count = (xp.empty(chunks, dtype=xp.uint32)
                                      for _ in range(2))
            launch('sparsify_split', (chunks,), (block,), 0,
                   source + (chunk_seg, status, lo_key, hi_key, below, cand_n,
                             cand, cand_start, cand_count, chunk_kept, bad))
            launch('sparsify_resolve', (tasks,), (block,), 0,
                   plan + (status, below, cand_n, cand, cand_start,
                           cand_count, keep_above, chunk_kept))
            launch('sparsify_fallback', (tasks,), (block,), 0,
                   source + (status, keep_above, chunk_kept))
        ends = xp.cumsum(chunk_kept)
        if capacity:
            launch('sparsify_compact', (chunks,), (block,), 0,
                   source + (chunk_seg, keep_above, ends, indices, data))
        indptr[1:] = ends[chunks_per_row - 1::chunks_per_row]
    return PendingCSR(indptr, indices, data, (rows, n), bad, stream)


def gather_fixed(g, index_sets, candidates, stream=None):
    """Sparsify each row on the fixed coordinate set of its candidate label.

    g: (rows, n) float32, NumPy or CuPy (other dtypes refused, as in
        :func:`percentile_sparsify`); must be finite.
    index_sets: :class:`CSR` of shape (n_labels, n) on g's device (a
        well-formed one, see :func:`~gradnet_cupy.kernels.csr.check_csr`);
        row c lists the coordinate set I_c, strictly ascending (its ``data``
        are not used: :func:`fixed_index_sets` stores the scores there).
    candidates: (rows,) integer labels in [0, n_labels), NumPy or CuPy.
    stream: CuPy stream for the GPU path; ignored for NumPy input.

    Row i of the result holds ``g[i, j]`` for the j in I_{candidates[i]}
    with ``g[i, j] != 0`` (like percentile_sparsify, stored entries are
    never zero). Returns a :class:`CSR` (rows, n) on g's device, ``indices``
    ascending within each row. Plain array indexing, the same code on NumPy
    and CuPy.
    """
    xp = _check_g(g)
    rows, n = g.shape
    if not isinstance(index_sets, CSR) or index_sets.shape[1] != n:
        raise GradnetError('index_sets must be a CSR with one column per '
                           f'column of g ({n})')
    with stream if stream is not None else contextlib.nullcontext():
        check_csr(index_sets)
        set_ptr = xp.asarray(index_sets.indptr)
        set_idx = xp.asarray(index_sets.indices).astype(xp.int64)
        labels = _check_candidates(xp, candidates, rows, index_sets.shape[0])
        if not bool(xp.isfinite(g).all()):
            raise GradnetError(NONFINITE_MESSAGE)
        first = set_ptr[labels]  # (rows,) where each row's set starts
        length = set_ptr[labels + 1] - first
        ends = xp.cumsum(length)  # (rows,) end of each row in the output
        total = int(ends[-1]) if rows else 0
        position = xp.arange(total, dtype=xp.int64)
        row_of = xp.searchsorted(ends, position, side='right')
        offset_in_set = position - (ends - length)[row_of]
        columns = set_idx[first[row_of] + offset_in_set]
        values = g[row_of, columns]
        nonzero = values != 0
        indptr = xp.zeros(rows + 1, dtype=xp.int64)
        indptr[1:] = xp.searchsorted(row_of[nonzero], xp.arange(rows),
                                     side='right')
        return CSR(indptr, columns[nonzero].astype(xp.int32),
                   values[nonzero], (rows, n))


def fixed_index_sets(g_sample, candidates, sizes, n_labels, fraction=0.1):
    """Per-label coordinate sets for :func:`gather_fixed` ("the most
    important 10% per label").

    g_sample: (rows, n) float32 sample of tangent features, NumPy or CuPy;
    candidates: (rows,) the candidate label of each sample row; sizes: the
    segment lengths (as in :func:`percentile_sparsify`); n_labels: number
    of labels, each of which must occur in candidates; fraction in (0, 1].

    For label c, score_j = mean of |g_sample[i, j]| (float64) over the rows
    with candidates[i] == c; in each segment of length m the
    ``max(1, round(fraction * m))`` coordinates of highest score are kept
    (ties: the lower column first). Computed on the host, so CPU and GPU
    agree exactly. Returns a :class:`CSR` (n_labels, n) on g_sample's
    device: row c lists I_c ascending, ``data`` the scores as float32.
    """
    xp = _check_g(g_sample)
    sample = to_numpy(g_sample)
    rows, n = sample.shape
    starts = segment_offsets(sizes, n)
    labels = _check_candidates(np, to_numpy(candidates), rows, n_labels)
    if not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise GradnetError(f'fraction must lie in (0, 1], got {fraction!r}')
    segments = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
    indices, scores = [], []
    for label in range(n_labels):
        members = sample[labels == label]
        if members.shape[0] == 0:
            raise GradnetError(f'no sample row has candidate label {label}')
        score = np.abs(members).mean(axis=0, dtype=np.float64)
        chosen = np.concatenate([_top_columns(score, start, stop, fraction)
                                 for start, stop in segments])
        indices.append(chosen)
        scores.append(score[chosen])
    indptr = np.zeros(n_labels + 1, dtype=np.int64)
    np.cumsum([chosen.size for chosen in indices], out=indptr[1:])
    return CSR(xp.asarray(indptr),
               xp.asarray(np.concatenate(indices).astype(np.int32)),
               xp.asarray(np.concatenate(scores).astype(np.float32)),
               (n_labels, n))


def _top_columns(score, start, stop, fraction):
    """Ascending columns of the max(1, round(fraction * m)) highest scores
    in score[start:stop] (m = stop - start; ties: the lower column)."""
    k = max(1, round(fraction * (stop - start)))
    return start + np.sort(np.argsort(-score[start:stop], kind='stable')[:k])


def _check_g(g):
    """The array module of g after checking it is a (rows, n) float32 array."""
    xp = get_array_module(g)
    if not isinstance(g, xp.ndarray):
        raise GradnetError(f'g must be a NumPy or CuPy array, got {type(g)}')
    if g.ndim != 2:
        raise GradnetError(f'g must be 2-D (rows x n), got shape {g.shape}')
    if g.dtype != np.float32:
        raise GradnetError(f'g must be float32, got {g.dtype}: convert '
                           'explicitly with g.astype(numpy.float32)')
    return xp


def _check_candidates(xp, candidates, rows, n_labels):
    """candidates as an int64 ``xp`` array after checking shape and range."""
    try:
        labels = xp.asarray(candidates)
    except TypeError as error:  # a CuPy array for NumPy g
        raise GradnetError(f'candidates must be on the device of g: {error}')
    if labels.shape != (rows,) or labels.dtype.kind not in 'iu':
        raise GradnetError(f'candidates must be {rows} integer labels, got '
                           f'shape {labels.shape} dtype {labels.dtype}')
    if rows and not bool(((labels >= 0) & (labels < n_labels)).all()):
        raise GradnetError(f'candidates must lie in [0, {n_labels})')
    return labels.astype(xp.int64)
