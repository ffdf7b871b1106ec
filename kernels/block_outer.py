"""Block-diagonal outer-product accumulation: ``G_b += sum_i w_i t_i[b] t_i[b]^T``.

For each CSR row ``t_i`` (weight ``w_i``, default 1) and each diagonal block
``b`` of a :class:`~gradnet_cupy.kernels.blocks.Blocks` (columns
``[start_b, start_b + size_b)``), the dense ``size_b x size_b`` block ``G_b``
of the packed array ``G`` gains ``w_i t_i[b] t_i[b]^T``, in place.

Two algorithms compute the same sums:

``sparse``
    Works on the nonzeros only: the entries of row ``i`` inside block ``b``
    are one contiguous sorted run of the CSR row, and each pair ``(j, k)`` of
    the run adds ``w_i * (t_ij * t_ik)`` to ``G_b[j, k]``; the work is
    ``sum over (row, block) of run_length ** 2``. NumPy: the reference below
    (the specification). CuPy: the CUDA kernel ``block_outer.cu``.
``dense``
    Zero-fills each block's slice of the rows into a dense ``(rows, size_b)``
    matrix ``X`` (equal-size blocks batched) and adds ``X^T diag(w) X`` by a
    matrix product (BLAS / cuBLAS); the work is ``rows * size_b ** 2``.

``method='auto'`` picks per block: dense where the block's density
``nnz_b / (rows * size_b)`` is at least the crossover density measured for
its size (``block_outer_crossover.json``, written from bench/results by
``bench/bench_metric.py``), sparse elsewhere.

Dtypes and rounding contract. ``G`` is float32 or float64 (float64
recommended for a metric: many batches are summed into it). The NumPy sparse
reference forms each term in float64 (``t_ij * t_ik`` of two float32 values
is exact there, then times ``w_i``), sums the terms of one call in float64 in
row order and adds the sum to ``G`` once (one rounding to ``G``'s dtype).
The CUDA kernel forms and sums the terms in ``G``'s dtype (float: the
product and each addition round to float32), in a fixed order (each G entry
is owned by one thread block; no atomics), so it is deterministic run to run
but not bitwise equal to the reference: entries agree to within a few units
of ``G``'s precision times the sum of ``|w_i t_ij t_ik|`` over the rows. The
dense path computes in ``G``'s dtype by BLAS, with the same kind of bound.
"""
import json
from importlib import resources

import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels._cuda import device_constants, launcher
from gradnet_cupy.kernels.blocks import Blocks
from gradnet_cupy.kernels.csr import check_csr

METHODS = ('auto', 'sparse', 'dense')
CUDA_SOURCE = 'block_outer.cu'
CUDA_TILE = 32                    # TILE of block_outer.cu
CUDA_ROWS = 32                    # ROWS of block_outer.cu
# G's dtype -> the template instantiation of block_outer.cu and its threads
# per block (32 * WARPS)
CUDA_KERNELS = {np.dtype(np.float32): ('block_outer<float, 8>', 8 * 32),
                np.dtype(np.float64): ('block_outer<double, 8>', 8 * 32)}
CUDA_NAME_EXPRESSIONS = tuple(name for name, _ in CUDA_KERNELS.values())
PREPASS_THREADS = 256   # threads per block of the position and row passes
PREPASS_KERNELS = ('block_outer_positions', 'block_outer_rows')
# the most bytes of position and row tables one group of blocks may take
# (sparse_launch); each group reads the whole CSR once more
TABLE_BYTES = 512 << 20
# bytes of global loads in flight per thread (for bench/roofline.py)
IN_FLIGHT_BYTES = {'block_outer_positions': 8, 'block_outer_rows': 8,
                   **{name: 8 for name in CUDA_NAME_EXPRESSIONS}}
# per kernel, the argument positions whose traffic does not grow with the
# rows of the batch (G, the tile and strip tables, the block ranges), for
# the bench
FIXED_ARGUMENTS = {'block_outer_positions': (), 'block_outer_rows': (2, 4),
                   **{name: (6, 8, 9, 10, 11, 12, 13, 14, 15, 16)
                      for name in CUDA_NAME_EXPRESSIONS}}
CROSSOVER_FILE = 'block_outer_crossover.json'
PAIR_CHUNK = 1 << 22    # pairs of nonzeros formed at once by the reference
DENSE_CHUNK = 1 << 24   # entries of the zero-filled (blocks, rows, size) slab


def block_outer_accumulate(csr, blocks, G, weights=None, stream=None,
                           method='auto', validate=True):
    """``G_b += sum_i weights[i] * t_i[b] t_i[b]^T`` for every block, in place.

    ``csr``: :class:`~gradnet_cupy.kernels.csr.CSR` (rows x
    ``blocks.n_columns``), NumPy or CuPy;
    ``blocks``: :class:`Blocks`; ``G``: float32 or float64
    ``(blocks.packed_size,)`` of the same array module, the packed blocks;
    ``weights``: optional float32 ``(rows,)`` of the same module (default
    all ones; other dtypes are refused, not cast: a float64 weight would be
    rounded to float32, so convert explicitly with
    ``weights.astype(numpy.float32)``); ``stream``: a ``cupy.cuda.Stream``
    to run on (CuPy only; default the current stream); ``method``:
    ``'auto' | 'sparse' | 'dense'`` (module docstring); ``validate``: check
    the CSR's contents (:func:`~gradnet_cupy.kernels.csr.check_csr`; its
    layout and every other argument are always checked). Returns ``G``.

    Host waits (CuPy input). Every device operation, validation included,
    is queued on ``stream``. The host waits for it only before the first
    kernel of the sums: once for ``validate`` (one read of the CSR flags),
    once for ``method='auto'`` (one read of the nonzeros per block, which
    the dispatcher needs), and on the first call with given blocks and
    selection on a device for the uploads of the block ranges, tile lists
    and dense-path index arrays (``_cuda.device_constants``). Afterwards it only queues work: the
    sums may still be running when this returns. So with ``validate=False``
    and ``method='sparse'`` or ``'dense'`` it never waits after a warm-up
    call. Only ``method='sparse'`` with ``validate=False`` can be captured
    in a CUDA graph: ``'dense'`` calls cuBLAS (CuPy's batched matmul), which
    CuPy refuses under capture; other settings under capture are refused
    with a one-line GradnetError before anything is queued.
    """
    xp = _check_inputs(csr, blocks, G, weights, method)
    if xp is not np:
        _check_capture(stream or xp.cuda.get_current_stream(), method,
                       validate)
    if xp is np or stream is None:
        return _accumulate(csr, blocks, G, weights, method, validate, xp)
    with stream:
        return _accumulate(csr, blocks, G, weights, method, validate, xp)


def _accumulate(csr, blocks, G, weights, method, validate, xp):
    if validate:
        check_csr(csr, blocks.n_columns)
    rows = csr.shape[0]
    w = xp.ones(rows, dtype=np.float32) if weights is None else weights
    entries = (_BlockEntries(csr, blocks)
               if method != 'sparse' or xp is np else None)
    if method == 'auto':
        dense = choose_dense(entries.counts(), blocks.sizes, rows, xp)
    else:
        dense = np.full(len(blocks), method == 'dense')
    if xp is not np:   # every upload (one host wait, first call) first
        uploads = [array for chunk in _dense_chunks(blocks, dense, rows)
                   for array in chunk[2:]]
        for group in launch_groups(blocks, ~dense, rows):
            uploads += tile_list(blocks, group) + strip_plan(blocks, group)
        device_constants(uploads, xp)
    if dense.any():
        _dense(entries, blocks, G, w, dense, xp)
    if not dense.all():
        if xp is np:
            _sparse_reference(entries, blocks, G, w, ~dense)
        else:
            sparse_launch(launcher(CUDA_SOURCE,
                                   name_expressions=CUDA_NAME_EXPRESSIONS),
                          csr, blocks, G, w, ~dense)
    return G


def sparse_launch(launch, csr, blocks, G, w, selected,
                  table_bytes=TABLE_BYTES):
    """Runs the CUDA kernels of ``block_outer.cu`` on the ``selected`` blocks
    (bool (k,), host) through ``launch(name, grid, block, shared_mem, args)``
    (``gradnet_cupy.kernels._cuda.launcher`` on a GPU, the CPU emulation in
    tests). ``csr``, ``G`` and ``w`` (float32 (rows,)) are arrays of one
    module. Queues three launches (positions, rows per strip, tiles;
    block_outer.cu) per group of blocks of :func:`launch_groups` (one group
    unless the position and row tables, 8 bytes per strip and row, would
    exceed ``table_bytes``) on the current stream; no host wait, but for
    the first upload of the strip and tile tables to a device
    (``_cuda.device_constants``).
    """
    for group in launch_groups(blocks, selected, csr.shape[0], table_bytes):
        _sparse_group(launch, csr, blocks, G, w, group)


def launch_groups(blocks, selected, rows, table_bytes=TABLE_BYTES):
    """The ``selected`` blocks (bool (k,), host) as consecutive groups (bool
    masks) whose position and row tables (8 bytes per strip and row) fit
    ``table_bytes``; a block whose own tables do not fit is a group alone.
    """
    ids = np.flatnonzero(selected)
    table = 8 * max(rows, 1) * -(-blocks.sizes[ids] // CUDA_TILE)
    groups, first, used = [], 0, 0
    for i, size in enumerate(table.tolist()):
        if i > first and used + size > table_bytes:
            groups.append(ids[first:i])
            first, used = i, 0
        used += size
    if len(ids):
        groups.append(ids[first:])
    masks = []
    for group in groups:
        mask = np.zeros(len(blocks), dtype=bool)
        mask[group] = True
        masks.append(mask)
    return masks


def _sparse_group(launch, csr, blocks, G, w, selected):
    """:func:`sparse_launch` of one group of blocks."""
    xp = get_array_module(G)
    rows = csr.shape[0]
    tiles = device_constants(tile_list(blocks, selected), xp)
    if not len(tiles[0]) or not rows:
        return
    plan = strip_plan(blocks, selected)
    n_boundaries = boundary_count(plan[2])
    at_most, strip_first, strip_boundary = device_constants(plan, xp)
    device = blocks.on(xp)
    name, threads = CUDA_KERNELS[G.dtype]
    indptr, indices, data, w = (xp.ascontiguousarray(a)
                                for a in (csr.indptr, csr.indices, csr.data, w))
    pos = xp.empty(n_boundaries * rows, dtype=np.int32)
    launch('block_outer_positions', (rows,), (PREPASS_THREADS,), 0,
           (indptr, indices, np.int64(rows), at_most, np.int32(n_boundaries),
            pos))
    strips = strip_boundary.shape[0]
    rows_of = xp.empty(strips * rows, dtype=np.int32)
    count = xp.empty(strips, dtype=np.int32)
    launch('block_outer_rows', (strips,), (PREPASS_THREADS,), 0,
           (pos, np.int64(rows), strip_boundary, rows_of, count))
    launch(name, (len(tiles[0]),), (threads,), 0,
           (indptr, indices, data, w, np.int64(rows), pos, strip_boundary,
            rows_of, count, device.starts, device.sizes, device.offsets,
            strip_first, *tiles, G))


def strip_plan(blocks, selected):
    """The strips of the kernels: every selected block cut into TILE-column
    strips, in column order. Returns host arrays ``(at_most, strip_first,
    strip_boundary)``: int32 (n_columns,) the number of boundaries (the
    strips' first columns and the blocks' ends, ascending, distinct) at or
    below each column; int32 (k,) each block's first strip (-1: not
    selected); int32 (strips,) the boundary index of each strip's first
    column (its end is the next boundary)."""
    ids = np.flatnonzero(selected)
    per_side = -(-blocks.sizes[ids] // CUDA_TILE)
    strip_first = np.full(len(blocks), -1, dtype=np.int32)
    strip_first[ids] = np.cumsum(per_side) - per_side
    within = np.arange(per_side.sum()) - np.repeat(strip_first[ids], per_side)
    columns = np.repeat(blocks.starts[ids], per_side) + CUDA_TILE * within
    ends = blocks.starts[ids] + blocks.sizes[ids]
    boundaries = np.union1d(columns, ends)
    at_most = np.searchsorted(boundaries, np.arange(blocks.n_columns),
                              side='right').astype(np.int32)
    strip_boundary = np.searchsorted(boundaries, columns).astype(np.int32)
    return [at_most, strip_first, strip_boundary]


def boundary_count(strip_boundary):
    """The number of boundaries of a :func:`strip_plan` from its host
    ``strip_boundary``: the last strip ends at the last boundary, the end of
    the last selected block."""
    return int(strip_boundary[-1]) + 2


def row_visits(csr, blocks, selected=None):
    """Passes of the kernel's tiles over CSR rows (host count, for the
    bench): a tile visits the rows of the one of its two strips that fewer
    rows touch."""
    selected = np.ones(len(blocks), bool) if selected is None else selected
    indptr, indices = to_numpy(csr.indptr), to_numpy(csr.indices)
    at_most, strip_first, strip_boundary = strip_plan(blocks, selected)
    row = np.repeat(np.arange(csr.shape[0]), np.diff(indptr))
    boundary = at_most[indices] - 1   # the boundary at or below the column
    strip = np.searchsorted(strip_boundary, boundary)
    inside = (strip < len(strip_boundary)) & (
        strip_boundary[np.minimum(strip, len(strip_boundary) - 1)] == boundary)
    touched = np.zeros(len(strip_boundary), dtype=np.int64)
    pairs = np.unique(strip[inside] * csr.shape[0] + row[inside])
    np.add.at(touched, pairs // max(csr.shape[0], 1), 1)
    block, tile_row, tile_col = tile_list(blocks, selected)
    first = strip_first[block]
    return int(np.minimum(touched[first + tile_row],
                          touched[first + tile_col]).sum())


def tile_list(blocks, selected):
    """The kernel's work items: every upper-triangle ``TILE x TILE`` tile
    ``(tile_row <= tile_col)`` of every selected block, as three int32
    arrays (block, tile_row, tile_col)."""
    ids = np.flatnonzero(selected)
    per_side = -(-blocks.sizes[ids] // CUDA_TILE)
    parts = ([], [], [])
    for n in np.unique(per_side):
        group = ids[per_side == n]
        row, col = np.triu_indices(n)
        parts[0].append(np.repeat(group, len(row)))
        parts[1].append(np.tile(row, len(group)))
        parts[2].append(np.tile(col, len(group)))
    return [np.concatenate(part or [np.zeros(0)]).astype(np.int32)
            for part in parts]


class _BlockEntries:
    """The nonzeros of a CSR batch with their blocks, in CSR order, built by
    array operations that never wait for the device.

    ``row``: int64 (nnz,); ``block``: int64 (nnz,) block id, ``n_blocks`` for
    an entry outside every block; ``local``: int64 column within the block
    (meaningless outside); ``data``: float32 (nnz,).
    """

    def __init__(self, csr, blocks):
        xp = get_array_module(csr.data)
        self.n_blocks = len(blocks)
        block = blocks.column_block(csr.indices)
        self.block = xp.where(block >= 0, block, self.n_blocks)
        # entry p lies in the row i with indptr[i] <= p < indptr[i + 1]
        self.row = xp.searchsorted(csr.indptr[1:],
                                   xp.arange(csr.nnz, dtype=np.int64),
                                   side='right')
        starts = xp.concatenate((blocks.on(xp).starts,
                                 xp.zeros(1, dtype=np.int64)))
        self.local = csr.indices.astype(np.int64) - starts[self.block]
        self.data = csr.data
        self.xp = xp

    def counts(self):
        """Nonzeros per block, int64 (k,), without a host wait
        (``cupy.bincount`` reads the largest value back; a scatter-add in
        uint64, which CuPy's atomic add supports, does not)."""
        if self.xp is np:
            return np.bincount(self.block, minlength=self.n_blocks + 1)[:-1]
        counts = self.xp.zeros(self.n_blocks + 1, dtype=np.uint64)
        self.xp.add.at(counts, self.block, np.uint64(1))
        return counts[:-1].astype(np.int64)


def _sparse_reference(entries, blocks, G, w, selected):
    """NumPy reference of the sparse algorithm on the ``selected`` blocks.

    Runs (the entries of one row in one block) are taken in (block, row)
    order; every ordered pair (j, k) of a run adds ``w * (t_j * t_k)`` in
    float64 to ``G_b[local_j, local_k]``; the sums of one call go into G by
    one addition.
    """
    keep = np.flatnonzero(np.append(selected, False)[entries.block])
    row, block = entries.row[keep], entries.block[keep]
    local, data = entries.local[keep], entries.data[keep].astype(np.float64)
    if not len(row):
        return
    key = row * entries.n_blocks + block          # runs are contiguous in it
    begin = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    length = np.diff(np.append(begin, len(key)))
    order = np.argsort(block[begin] * (row[-1] + 1) + row[begin])
    begin, length = begin[order], length[order]
    pairs = np.cumsum(length * length)
    first = 0
    while first < len(begin):
        done = pairs[first - 1] if first else 0
        last = max(first + 1,
                   int(np.searchsorted(pairs, done + PAIR_CHUNK, 'right')))
        _add_pairs(begin[first:last], length[first:last], row, block, local,
                   data, blocks, G, w)
        first = last


def _add_pairs(begin, length, row, block, local, data, blocks, G, w):
    """Adds all pairs of the runs ``(begin, length)`` (sorted by block)."""
    count = length * length
    run = np.repeat(np.arange(len(begin)), count)
    rank = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count,
                                                   count)
    j = begin[run] + rank // length[run]
    k = begin[run] + rank % length[run]
    b = block[j]
    flat = blocks.offsets[b] + local[j] * blocks.sizes[b] + local[k]
    term = w[row[j]].astype(np.float64) * (data[j] * data[k])
    lo, hi = blocks.offsets[b[0]], blocks.offsets[b[-1] + 1]
    G[lo:hi] += np.bincount(flat - lo, weights=term, minlength=hi - lo)


def _dense(entries, blocks, G, w, selected, xp):
    """Dense path on the ``selected`` blocks (bool (k,), host): per chunk of
    equal-size blocks (:func:`_dense_chunks`) a zero-filled (chunk, rows,
    size) slab X and ``G_b += X_b^T diag(w) X_b`` by batched matmul in G's
    dtype. The entries of other blocks are written to one extra slab that
    is dropped (no filtering, which on CuPy would wait for the device)."""
    rows = len(w)
    for size, ids, slab, offsets in _dense_chunks(blocks, selected, rows):
        slab, offsets = device_constants((slab, offsets), xp)
        where = slab[entries.block]
        local = xp.where(where < len(ids), entries.local, 0)
        X = xp.zeros((len(ids) + 1, rows, size), dtype=G.dtype)
        X[where, entries.row, local] = entries.data
        X = X[:-1]
        product = xp.matmul(X.transpose(0, 2, 1),
                            X * w.astype(G.dtype)[None, :, None])
        target = offsets[:, None] + xp.arange(size ** 2)
        G[target.ravel()] += product.reshape(-1)


def _dense_chunks(blocks, selected, rows):
    """The dense path's work as host arrays: per chunk of at most
    DENSE_CHUNK slab entries of equal-size selected blocks, ``(size, ids,
    slab, offsets)``: the block ids, each block's slab in the chunk
    (int64 (k + 1,), ``len(ids)`` for the others and for entries outside
    every block) and the blocks' packed offsets."""
    sizes = blocks.sizes
    chosen = np.flatnonzero(selected)
    chunks = []
    for size in np.unique(sizes[chosen]).tolist():
        group = chosen[sizes[chosen] == size]
        per_chunk = max(1, DENSE_CHUNK // max(1, rows * size))
        for first in range(0, len(group), per_chunk):
            ids = group[first:first + per_chunk]
            slab = np.full(len(blocks) + 1, len(ids), dtype=np.int64)
            slab[ids] = np.arange(len(ids))
            chunks.append((size, ids, slab, blocks.offsets[ids]))
    return chunks


def load_crossovers():
    """The packaged crossover table: ``{backend: {'block_sizes': [...],
    'crossover_density': [...], ...}}`` for backends ``numpy`` and ``cupy``."""
    text = resources.files('gradnet_cupy.kernels').joinpath(
        CROSSOVER_FILE).read_text()
    return json.loads(text)['crossovers']


def crossover_density(backend, sizes, table=None):
    """Density at and above which the dense path is used, per block size.

    Interpolates the measured crossovers linearly in ``log2(size)``, clamped
    to the end points. ``backend``: ``'numpy' | 'cupy'``; ``sizes``: int
    array (host). Returns float64 of ``sizes``' shape.
    """
    entry = (table or load_crossovers())[backend]
    return np.interp(np.log2(np.asarray(sizes, dtype=np.float64)),
                     np.log2(entry['block_sizes']),
                     entry['crossover_density'])


def choose_dense(counts, sizes, rows, xp):
    """Bool (k,) host array: which blocks the auto dispatcher sends to the
    dense path, from nonzeros per block ``counts`` (int (k,), host or of
    module ``xp``: read back once), host ``sizes`` and the batch's ``rows``;
    ``xp`` (the batch's module) picks the crossover table."""
    backend = 'numpy' if xp is np else 'cupy'
    threshold = crossover_density(backend, sizes)
    density = to_numpy(counts) / (max(rows, 1) * np.asarray(sizes))
    return density >= threshold


def _check_capture(stream, method, validate):
    """GradnetError when ``stream`` (a cupy.cuda.Stream) is being captured
    into a CUDA graph and the call would wait on the host or call cuBLAS."""
    if stream.is_capturing() and (method != 'sparse' or validate):
        raise GradnetError(
            f"CUDA graph capture needs method='sparse' and validate=False, "
            f"got method={method!r}, validate={validate}: 'auto' and "
            "validate read back to the host, and 'dense' calls cuBLAS, "
            "which CuPy does not capture")


def _check_inputs(csr, blocks, G, weights, method):
    if method not in METHODS:
        raise GradnetError(
            f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(blocks, Blocks):
        raise GradnetError(f'expected Blocks, got {type(blocks).__name__}')
    xp = check_csr(csr, blocks.n_columns, contents=False)
    if get_array_module(G) is not xp:
        raise GradnetError('G and the CSR batch must be on the same device')
    if G.dtype not in (np.float32, np.float64):
        raise GradnetError(f'G must be float32 or float64, got {G.dtype}')
    if G.shape != (blocks.packed_size,) or not G.flags.c_contiguous:
        raise GradnetError(
            f'G must be the packed blocks, a contiguous array of shape '
            f'({blocks.packed_size},), got {G.shape}')
    if weights is not None:
        if get_array_module(weights) is not xp:
            raise GradnetError(
                'weights and the CSR batch must be on the same device')
        if weights.shape != (csr.shape[0],):
            raise GradnetError(
                f'weights must have shape ({csr.shape[0]},), got '
                f'{weights.shape}')
        if weights.dtype != np.float32:
            raise GradnetError(
                f'weights must be float32, got {weights.dtype}: convert '
                'explicitly with weights.astype(numpy.float32)')
    return xp
