"""Reading a tangent store: :class:`TangentStore` and its :class:`Batch`.

Its one job is row access to a store: a finished HDF5 file, or (with
``allow_incomplete``) the journal of an unfinished extraction, behind one
interface (``_H5Rows`` and ``_JournalRows``). All rows come back as NumPy
arrays on the host; :mod:`.format` imports ``hdf5plugin``, which
registers the Blosc2 filter of the default compression with HDF5. A truncated or corrupt file, a file that is not a
store, or one of another format version is refused with a
:class:`GradnetError`.

Neighbours: :mod:`.format` (what the bytes are), :mod:`.writer`
(:class:`~.writer.StoreWriter` writes stores), :mod:`.merge` (reads shards
through this class).

Typical use by training::

    with TangentStore.open(out) as store:
        stats = store.column_stats()
        for csr, sample, candidate, target in store.iter_batches(
                25, shuffle=True, seed=epoch):
            ...
"""
import json
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from gradnet_cupy import __version__
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels.csr import CSR
from gradnet_cupy.normalize import STAT_FIELDS, ColumnStats
from gradnet_cupy.store.format import (
    _CHUNK_CACHE_BYTES, FORMAT, FORMAT_VERSION, _incomplete_message,
    _journal, _RECORD_FIELDS, _scan_journal)
from gradnet_cupy.store.prefetch import prefetch as prefetch_items


class Batch(NamedTuple):
    """Rows of a store: ``csr`` (NumPy :class:`CSR`), ``sample`` int64,
    ``candidate`` int16 and ``target`` int16 arrays of length ``rows``."""
    csr: CSR
    sample: np.ndarray
    candidate: np.ndarray
    target: np.ndarray



class _H5Rows:
    """Row access to a finished store file (the reader's backend)."""

    def __init__(self, path, allow_incomplete):
        self.path = path
        try:
            self.file = h5py.File(path, 'r', rdcc_nbytes=_CHUNK_CACHE_BYTES,
                                  rdcc_w0=1.0)
        except OSError as err:
            with open(path, 'rb') as f:
                signature = f.read(8)
            what = ('a truncated or corrupt HDF5 file'
                    if signature == b'\x89HDF\r\n\x1a\n'
                    else 'not an HDF5 file')
            raise GradnetError(f'{path}: cannot open the tangent store: it '
                               f'is {what} ({err})') from None
        try:
            self._load(allow_incomplete)
        except GradnetError:
            self.file.close()
            raise
        except (KeyError, OSError, RuntimeError, ValueError) as err:
            self.file.close()
            raise GradnetError(f'{path}: corrupt tangent store ({err})') \
                from None

    def _load(self, allow_incomplete):
        attrs = self.file.attrs
        if attrs.get('format') != FORMAT:
            raise GradnetError(f'{self.path}: an HDF5 file, but not a '
                               'gradnet-cupy tangent store (no format mark)')
        if attrs.get('format_version') != FORMAT_VERSION:
            raise GradnetError(
                f"{self.path}: written by store format version "
                f"{attrs.get('format_version')}; this gradnet-cupy "
                f'({__version__}) reads version {FORMAT_VERSION}: re-extract,'
                ' or read it with the gradnet-cupy that wrote it')
        self.header = {
            'n_columns': int(attrs['n_columns']),
            'layout': json.loads(attrs['layout']),
            'provenance': json.loads(attrs['provenance']),
            'storage': json.loads(attrs['storage'])}
        n_rows, nnz = int(attrs['n_rows']), int(attrs['nnz'])
        self.complete = bool(attrs.get('complete', False))
        group = self.file['X']
        self.indices, self.data = group['indices'], group['data']
        self.indptr = group['indptr'][:]
        self.sample = self.file['sample'][:]
        self.candidate = self.file['candidate'][:]
        self.target = self.file['target'][:]
        if not self.complete and not allow_incomplete:
            raise GradnetError(f'{self.path}: extraction incomplete (the '
                               'file was never finalized)')
        self.header['total_rows'] = n_rows
        shapes_ok = (self.indptr.shape == (n_rows + 1,)
                     and self.indices.shape == self.data.shape == (nnz,)
                     and self.sample.shape == self.candidate.shape
                     == self.target.shape == (n_rows,)
                     and tuple(group.attrs['shape'])
                     == (n_rows, self.header['n_columns']))
        if not shapes_ok or self.indptr[0] != 0 or self.indptr[-1] != nnz \
                or np.any(np.diff(self.indptr) < 0):
            raise GradnetError(f'{self.path}: corrupt tangent store (the '
                               'dataset sizes disagree)')

    def values(self, start, stop):
        """``(indices, data)`` of the nonzeros ``start:stop``."""
        try:
            return self.indices[start:stop], self.data[start:stop]
        except OSError as err:
            raise GradnetError(f'{self.path}: corrupt tangent store, a read '
                               f'failed ({err})') from None

    def column_stats(self):
        try:
            group = self.file['column_stats']
            return {name: group[name][:] for name in STAT_FIELDS}
        except (KeyError, OSError) as err:
            raise GradnetError(f'{self.path}: corrupt column statistics '
                               f'({err})') from None

    def close(self):
        self.file.close()


class _JournalRows:
    """Row access to an unfinished extraction's journal (read-only). The
    per-row arrays are read at opening; the nonzeros are read from the file
    when asked for (not memory-mapped: mapped pages would stay resident)."""

    def __init__(self, path):
        self.path = path
        self.header, records, _ = _scan_journal(path)
        self.complete = False
        self.file = open(path, 'rb')
        per_row = {name: [np.zeros(0, dtype)] for name, dtype, length
                   in _RECORD_FIELDS if length == 'rows'}
        self.value_offsets = []     # (indices, data) offsets of each record
        for record in records:
            offset = record.offset
            for name, dtype, length in _RECORD_FIELDS:
                count = record.rows if length == 'rows' else record.nnz
                if name in per_row:
                    per_row[name].append(self._array(offset, dtype, count))
                elif name == 'indices':
                    self.value_offsets.append((offset, offset + 4 * count))
                offset += count * np.dtype(dtype).itemsize
        self.nnz_starts = np.cumsum([0] + [r.nnz for r in records])
        self.indptr = np.concatenate(
            [[0], np.concatenate(per_row.pop('row_nnz')).cumsum()])
        for name, arrays in per_row.items():
            setattr(self, name, np.concatenate(arrays))

    def _array(self, offset, dtype, count):
        """``count`` values of ``dtype`` at byte ``offset`` of the file."""
        self.file.seek(offset)
        return np.frombuffer(self.file.read(count * np.dtype(dtype).itemsize),
                             dtype)

    def values(self, start, stop):
        first = np.searchsorted(self.nnz_starts, start, side='right') - 1
        indices, data = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
        for k in range(max(first, 0), len(self.value_offsets)):
            base, end = self.nnz_starts[k], self.nnz_starts[k + 1]
            if base >= stop:
                break
            a, b = max(start - base, 0), min(stop, end) - base
            at_indices, at_data = self.value_offsets[k]
            indices.append(self._array(at_indices + 4 * a, np.int32, b - a))
            data.append(self._array(at_data + 4 * a, np.float32, b - a))
        return np.concatenate(indices), np.concatenate(data)

    def column_stats(self):
        stats = ColumnStats(self.header['n_columns'])
        for k in range(len(self.value_offsets)):
            stats.add_entries(*self.values(self.nnz_starts[k],
                                           self.nnz_starts[k + 1]))
        return stats.as_dict()

    def close(self):
        self.file.close()


class TangentStore:
    """Read access to a tangent store, made by :meth:`open` (writing:
    :class:`~gradnet_cupy.store.writer.StoreWriter`). All rows come back as
    NumPy arrays."""

    def __init__(self, path, rows):
        self.path = Path(path)
        self._rows = rows

    @classmethod
    def open(cls, path, allow_incomplete=False):
        """Open the store at ``path`` for reading.

        An unfinished extraction (only ``PATH.partial`` exists) is refused
        with "extraction incomplete: N of M rows" unless
        ``allow_incomplete``, which reads the rows committed so far (column
        statistics are then computed by a pass over them).
        """
        path = Path(path)
        if path.exists():
            return cls(path, _H5Rows(path, allow_incomplete))
        journal = _journal(path)
        if not journal.exists():
            raise GradnetError(f'{path}: no tangent store there')
        if allow_incomplete:
            return cls(path, _JournalRows(journal))
        header, records, _ = _scan_journal(journal, verify=False)
        raise GradnetError(_incomplete_message(
            path, sum(r.rows for r in records), header['total_rows']))

    # -- metadata --

    def __len__(self):
        return len(self._rows.sample)

    @property
    def n_columns(self):
        return self._rows.header['n_columns']

    @property
    def shape(self):
        return (len(self), self.n_columns)

    @property
    def nnz(self):
        return int(self._rows.indptr[-1])

    @property
    def layout(self):
        return self._rows.header['layout']

    @property
    def provenance(self):
        return self._rows.header['provenance']

    @property
    def storage(self):
        """HDF5 settings: compression, chunk_elements, shuffle, fletcher32."""
        return self._rows.header['storage']

    @property
    def complete(self):
        return self._rows.complete

    @property
    def sample(self):
        """int64 (rows,): the sample index of every row (in memory)."""
        return self._rows.sample

    def column_stats(self):
        """Per-column statistics of the stored nonzeros: dict of ``count``
        (int64), ``min``, ``max``, ``sum``, ``sumsq`` (float64), each
        ``(n_columns,)``; min/max are ±inf for columns without nonzeros."""
        return self._rows.column_stats()

    # -- rows --

    def read(self, start, stop):
        """Rows ``start:stop`` (0 <= start <= stop <= len) as a Batch."""
        if not 0 <= start <= stop <= len(self):
            raise GradnetError(f'rows {start}:{stop} are outside the store\'s'
                               f' {len(self)} rows')
        indptr = self._rows.indptr[start:stop + 1]
        indices, data = self._rows.values(indptr[0], indptr[-1])
        return self._batch(indptr - indptr[0], indices, data,
                           slice(start, stop))

    def read_rows(self, rows):
        """The given rows (int array, any order, repeats allowed) as a Batch
        in that order. Reads each run of consecutive rows (``r, r + 1,
        ...`` in the requested order) at once."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(
                rows.dtype, np.integer)):
            raise GradnetError(f'row indices must be a 1-D integer array, '
                               f'got {rows.dtype} {rows.shape}')
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise GradnetError(f'row indices must lie in [0, {len(self)}), '
                               f'got [{rows.min()}, {rows.max()}]')
        rows = rows.astype(np.int64)
        stored = self._rows.indptr
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        pieces = [self._rows.values(stored[run[0]], stored[run[-1] + 1])
                  for run in np.split(rows, breaks) if run.size]
        indices = np.concatenate([np.zeros(0, np.int32)]
                                 + [p[0] for p in pieces])
        data = np.concatenate([np.zeros(0, np.float32)]
                              + [p[1] for p in pieces])
        indptr = np.concatenate([[0], np.cumsum(stored[rows + 1]
                                                - stored[rows])])
        return self._batch(indptr, indices, data, rows)

    def _batch(self, indptr, indices, data, rows):
        csr = CSR(indptr.astype(np.int64), indices, data,
                  (len(indptr) - 1, self.n_columns))
        return Batch(csr, self._rows.sample[rows].copy(),
                     self._rows.candidate[rows].copy(),
                     self._rows.target[rows].copy())

    def iter_batches(self, batch_size, shuffle=False, seed=0,
                     group_by_sample=False, prefetch=0):
        """Yield Batches covering every row once.

        Sequential by default; ``shuffle`` permutes with
        ``numpy.random.default_rng(seed)`` (same seed, same batches).
        ``group_by_sample``: every batch holds all rows of ``batch_size``
        samples (groups in order of first appearance, shuffled as wholes
        when ``shuffle``; rows of a group in stored order) — for the
        all-candidates prediction. Otherwise ``batch_size`` counts rows; the
        last batch may be smaller. ``prefetch``: read (and decompress) up
        to this many batches ahead in a background thread
        (:func:`~.prefetch.prefetch`; the same batches in the same order);
        0 reads each batch when it is asked for.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise GradnetError(f'batch size must be a positive integer, got '
                               f'{batch_size!r}')
        batches = self._batches(int(batch_size), shuffle, seed,
                                group_by_sample)
        return prefetch_items(batches, prefetch) if prefetch else batches

    def _batches(self, batch_size, shuffle, seed, group_by_sample):
        """The batches of :meth:`iter_batches`, read when asked for."""
        rng = np.random.default_rng(seed)
        if not group_by_sample:
            if not shuffle:
                for start in range(0, len(self), batch_size):
                    yield self.read(start, min(start + batch_size, len(self)))
                return
            order = rng.permutation(len(self))
            for start in range(0, len(self), batch_size):
                yield self.read_rows(order[start:start + batch_size])
            return
        _, first, group = np.unique(self.sample, return_index=True,
                                    return_inverse=True)
        rank = np.argsort(np.argsort(first))[group]   # by first appearance
        rows = np.argsort(rank, kind='stable')
        bounds = np.concatenate([[0], np.cumsum(np.bincount(rank))])
        groups = np.arange(len(first))
        if shuffle:
            groups = rng.permutation(groups)
        for start in range(0, len(groups), batch_size):
            chosen = groups[start:start + batch_size]
            yield self.read_rows(np.concatenate(
                [np.zeros(0, np.int64)]
                + [rows[bounds[g]:bounds[g + 1]] for g in chosen]))

    def close(self):
        self._rows.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
