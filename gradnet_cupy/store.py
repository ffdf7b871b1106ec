"""The tangent store: sparse CSR tangent features in one HDF5 file (DESIGN §4).

File layout (``h5py``; readable without gradnet-cupy)::

    /                 attrs: format, format_version, complete, n_rows,
                      n_columns, nnz, layout (JSON), provenance (JSON),
                      storage (JSON)[, merged_from (JSON)]
    /X                CSR group in AnnData's ``csr_matrix`` encoding: attrs
                      encoding-type, encoding-version, shape; datasets
                      data float32 (nnz,), indices int32 (nnz,),
                      indptr int64 (n_rows + 1,)
    /sample           int64 (n_rows,)   index of the sample in its split
    /candidate        int16 (n_rows,)   candidate label of the row
    /target           int16 (n_rows,)   true label of the sample
    /column_stats/    count int64, min, max, sum, sumsq float64 (n_columns,):
                      per-column statistics of the stored nonzeros (min
                      +inf and max -inf for a column without nonzeros)

Writing is two-phase, which is what makes it crash safe:

1. :meth:`StoreWriter.append` writes each batch as one record of an
   append-only *journal*, ``PATH.partial``: a fixed header, then records
   ``[magic, n_rows, nnz, payload CRC32, header CRC32][payload]``. A record
   counts only when both CRCs match, so a process killed in the middle of a
   write leaves a torn tail that the next :meth:`TangentStore.resume` (or
   :meth:`TangentStore.create_or_resume`) cuts off: the extraction goes on
   from the last complete batch, without duplicating or losing rows.
2. :meth:`StoreWriter.finalize` converts the journal into the HDF5 file
   (chunked, compressed, per-chunk Fletcher-32 checksums; the column
   statistics are accumulated while writing) under ``PATH.tmp``, flushes it
   to disk, renames it to ``PATH`` atomically and deletes the journal.

Hence a file at ``PATH`` is always a finished store. A kill during
finalize leaves the journal intact and finalize is simply redone. Power loss
(not just a killed process) can lose the journal's recent, unsynced records,
which the CRCs detect like a torn tail. A truncated or corrupt ``PATH``, a
file that is not a store, or one of another format version is refused with
a :class:`GradnetError`.

Typical use by an extraction (``rows`` in a fixed, reproducible order)::

    writer = TangentStore.create_or_resume(out, n_columns, layout,
                                           provenance, total_rows=len(rows))
    for start in range(writer.n_rows, len(rows), batch):
        csr = percentile_sparsify(tangents(rows[start:start + batch]), ...)
        writer.append(csr, sample, candidate, target)
    writer.finalize()

and by training::

    with TangentStore.open(out) as store:
        stats = store.column_stats()
        for csr, sample, candidate, target in store.iter_batches(
                25, shuffle=True, seed=epoch):
            ...
"""
import datetime
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from gradnet_cupy import __version__
from gradnet_cupy.backend import to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels.csr import CSR
from gradnet_cupy.normalize import STAT_FIELDS, ColumnStats

FORMAT = 'gradnet-cupy tangent store'
FORMAT_VERSION = 1
JOURNAL_SUFFIX = '.partial'
TMP_SUFFIX = '.tmp'
SHARD_KEY = 'shard'

COMPRESSIONS = ('gzip', 'lzf', 'none')
# From bench/results/store-cpu.json (real MNIST CNN tangents, q = 85): gzip
# (level 1 + shuffle) stores 3.9 bytes per nonzero against 4.3 for lzf and
# 8.0 uncompressed, reads as fast per CPU second as lzf, and every HDF5
# reader decodes it (lzf needs h5py). 'none' reads about 3x faster at twice
# the size. Chunks of 2**14 elements: random rows stay cheap to read.
DEFAULT_COMPRESSION = 'gzip'
DEFAULT_CHUNK_ELEMENTS = 1 << 14
_RESERVED_PROVENANCE = ('package_version', 'created')
_CHUNK_CACHE_BYTES = 16 << 20


class Batch(NamedTuple):
    """Rows of a store: ``csr`` (NumPy :class:`CSR`), ``sample`` int64,
    ``candidate`` int16 and ``target`` int16 arrays of length ``rows``."""
    csr: CSR
    sample: np.ndarray
    candidate: np.ndarray
    target: np.ndarray


class _Block(NamedTuple):
    """Rows on their way to the HDF5 file: ``row_nnz`` int64 (rows,) and
    the columns of :class:`Batch` as flat NumPy arrays."""
    row_nnz: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    sample: np.ndarray
    candidate: np.ndarray
    target: np.ndarray


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (the model snapshot checksum)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for piece in iter(lambda: f.read(1 << 20), b''):
            digest.update(piece)
    return digest.hexdigest()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f'{type(value).__name__} is not JSON serializable')


def _jsonable(value, what):
    """``value`` as it reads back from JSON (tuples become lists, NumPy
    scalars Python numbers); GradnetError if it cannot be stored as JSON."""
    try:
        return json.loads(json.dumps(value, default=_json_default,
                                     allow_nan=False))
    except (TypeError, ValueError) as err:
        raise GradnetError(f'{what} must be JSON-serializable: {err}') \
            from None


def _identity(provenance):
    """What must match for two files to be the same extraction."""
    return {k: v for k, v in provenance.items() if k != 'created'}


def _differences(found, expected):
    keys = sorted(set(found) | set(expected))
    return ', '.join(f'{k}: {found.get(k)!r} (expected {expected.get(k)!r})'
                     for k in keys if found.get(k) != expected.get(k))


def _storage(compression, chunk_elements):
    """The HDF5 storage settings of a new store (a JSON-able dict)."""
    if compression not in COMPRESSIONS:
        raise GradnetError(f'unknown compression {compression!r}: choose one '
                           f"of {', '.join(COMPRESSIONS)}")
    chunk_elements = int(chunk_elements)
    if not 1 <= chunk_elements <= 1 << 24:
        raise GradnetError(
            f'chunk_elements must be in [1, 2**24], got {chunk_elements}')
    return {'compression': compression, 'chunk_elements': chunk_elements,
            'shuffle': compression != 'none', 'fletcher32': True}


def _dataset_options(storage):
    """h5py ``create_dataset`` keyword arguments for ``storage``."""
    options = {'chunks': (storage['chunk_elements'],), 'maxshape': (None,),
               'shuffle': storage['shuffle'],
               'fletcher32': storage['fletcher32']}
    if storage['compression'] == 'gzip':
        options.update(compression='gzip', compression_opts=1)
    elif storage['compression'] == 'lzf':
        options.update(compression='lzf')
    return options


# ---------------------------------------------------------------- journal --

_JOURNAL_MAGIC = b'GNCJRNL\n'
_JOURNAL_HEAD = struct.Struct('<8sIII')     # magic, version, len, crc
_RECORD_MAGIC = b'GREC'
_RECORD_HEAD = struct.Struct('<4sIQII')     # magic, rows, nnz, crc, crc
_RECORD_FIELDS = (('row_nnz', np.int64, 'rows'), ('sample', np.int64, 'rows'),
                  ('indices', np.int32, 'nnz'), ('data', np.float32, 'nnz'),
                  ('candidate', np.int16, 'rows'),
                  ('target', np.int16, 'rows'))


def _pad8(size):
    return -size % 8


def _payload_size(rows, nnz):
    size = 20 * rows + 8 * nnz
    return size + _pad8(size)


class _Record(NamedTuple):
    """Where one committed batch lies in the journal."""
    offset: int      # of the payload
    rows: int
    nnz: int


def _record_arrays(buffer, record):
    """The :class:`_Block` of ``record``, as views into ``buffer``."""
    arrays, offset = {}, record.offset
    for name, dtype, length in _RECORD_FIELDS:
        count = record.rows if length == 'rows' else record.nnz
        arrays[name] = np.frombuffer(buffer, dtype, count, offset)
        offset += count * np.dtype(dtype).itemsize
    return _Block(**arrays)


def _write_journal_header(path, header):
    """Create the journal ``path`` holding only ``header``, atomically."""
    text = json.dumps(header).encode()
    head = _JOURNAL_HEAD.pack(_JOURNAL_MAGIC, FORMAT_VERSION, len(text),
                              zlib.crc32(text))
    new = path.with_name(path.name + '.new')
    with open(new, 'wb') as f:
        f.write(head + text + bytes(_pad8(len(head) + len(text))))
        f.flush()
        os.fsync(f.fileno())
    os.replace(new, path)


def _scan_journal(path, verify=True):
    """Read a journal: ``(header, records, end)``. ``records`` are the
    complete batches (CRCs checked when ``verify``) in order; ``end`` is the
    byte offset after the last of them (anything beyond is a torn tail)."""
    with open(path, 'rb') as f:
        buffer = f.read(_JOURNAL_HEAD.size)
        if len(buffer) < _JOURNAL_HEAD.size:
            raise GradnetError(f'{path}: partial-extraction journal is cut '
                               'short in its header; delete it to restart')
        magic, version, length, crc = _JOURNAL_HEAD.unpack(buffer)
        text = f.read(length)
        if magic != _JOURNAL_MAGIC or zlib.crc32(text) != crc:
            raise GradnetError(f'{path}: not a gradnet-cupy partial-'
                               'extraction journal, or its header is corrupt')
        if version != FORMAT_VERSION:
            raise GradnetError(
                f'{path}: partial extraction written by store format version '
                f'{version}; this gradnet-cupy writes version {FORMAT_VERSION}'
                '; delete it to restart the extraction')
        header = json.loads(text)
        end = _JOURNAL_HEAD.size + length + _pad8(_JOURNAL_HEAD.size + length)
        size = os.fstat(f.fileno()).st_size
        records = []
        while end + _RECORD_HEAD.size <= size:
            f.seek(end)
            head = f.read(_RECORD_HEAD.size)
            magic, rows, nnz, payload_crc, head_crc = _RECORD_HEAD.unpack(head)
            payload = _payload_size(rows, nnz)
            start = end + _RECORD_HEAD.size
            if (magic != _RECORD_MAGIC or zlib.crc32(head[:-4]) != head_crc
                    or start + payload > size):
                break
            if verify and _crc_of_file_range(f, start, payload) != payload_crc:
                break
            records.append(_Record(start, rows, nnz))
            end = start + payload
    return header, records, end


def _crc_of_file_range(f, start, size):
    f.seek(start)
    crc = 0
    while size:
        piece = f.read(min(size, 64 << 20))
        if not piece:
            break
        crc = zlib.crc32(piece, crc)
        size -= len(piece)
    return crc


def _lock(f, path):
    """Hold an exclusive lock on the open journal ``f`` (released when it is
    closed or the process dies); GradnetError if another writer holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection against two writers
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise GradnetError(f'{path} is being written by another process '
                           '(its partial-extraction journal is locked)') \
            from None


# ------------------------------------------------------------ HDF5 writer --

def _write_h5(path, header, n_rows, nnz, blocks, extra_attrs=None):
    """Write a complete store at ``path`` from ``blocks`` (:class:`_Block`s
    holding ``n_rows`` rows and ``nnz`` nonzeros in all), then flush it to
    disk. The column statistics are accumulated on the way."""
    n_columns = header['n_columns']
    options = _dataset_options(header['storage'])
    stats = ColumnStats(n_columns)
    with h5py.File(path, 'w', rdcc_nbytes=_CHUNK_CACHE_BYTES) as f:
        group = f.create_group('X')
        group.attrs['encoding-type'] = 'csr_matrix'
        group.attrs['encoding-version'] = '0.1.0'
        group.attrs['shape'] = np.array([n_rows, n_columns], dtype=np.int64)
        data = group.create_dataset('data', (nnz,), np.float32, **options)
        indices = group.create_dataset('indices', (nnz,), np.int32, **options)
        indptr = group.create_dataset('indptr', (n_rows + 1,), np.int64,
                                      **options)
        per_row = {name: f.create_dataset(name, (n_rows,), dtype, **options)
                   for name, dtype in (('sample', np.int64),
                                       ('candidate', np.int16),
                                       ('target', np.int16))}
        indptr[0] = 0
        row = pos = 0
        for block in blocks:
            rows, count = len(block.sample), len(block.indices)
            if rows == 0:
                continue
            if row + rows > n_rows or pos + count > nnz:
                raise GradnetError(f'{path}: more rows than announced')
            data[pos:pos + count] = block.data
            indices[pos:pos + count] = block.indices
            indptr[row + 1:row + rows + 1] = pos + np.cumsum(block.row_nnz)
            for name, dataset in per_row.items():
                dataset[row:row + rows] = getattr(block, name)
            stats.add_entries(block.indices, block.data)
            row, pos = row + rows, pos + count
        if (row, pos) != (n_rows, nnz):
            raise GradnetError(f'{path}: got {row} rows and {pos} nonzeros, '
                               f'expected {n_rows} and {nnz}')
        stats_group = f.create_group('column_stats')
        for name, values in stats.as_dict().items():
            stats_group.create_dataset(name, data=values, compression='gzip',
                                       fletcher32=True)
        attrs = {'format': FORMAT, 'format_version': FORMAT_VERSION,
                 'n_rows': n_rows, 'n_columns': n_columns, 'nnz': nnz,
                 'layout': json.dumps(header['layout']),
                 'provenance': json.dumps(header['provenance']),
                 'storage': json.dumps(header['storage'])}
        attrs.update(extra_attrs or {})
        f.attrs.update(attrs)
        f.attrs['complete'] = True
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _install(tmp, path):
    """Rename the finished ``tmp`` to ``path`` atomically and durably."""
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------ validation --

def _host(array):
    """A NumPy array of a NumPy or CuPy array (or anything array-like)."""
    if hasattr(array, '__cuda_array_interface__'):
        return to_numpy(array)
    return np.asarray(array)


def _check_batch(csr, sample, candidate, target, n_columns):
    """Host copies of one appended batch as a :class:`_Block`, after checking
    it (GradnetError naming the problem)."""
    indptr = _host(csr.indptr)
    indices = _host(csr.indices)
    data = _host(csr.data)
    rows = len(indptr) - 1
    if rows < 0 or tuple(csr.shape) != (rows, n_columns):
        raise GradnetError(f'batch shape {tuple(csr.shape)} with '
                           f'{len(indptr)} indptr entries does not fit a '
                           f'store of {n_columns} columns')
    if not (np.issubdtype(indptr.dtype, np.integer)
            and np.issubdtype(indices.dtype, np.integer)
            and np.issubdtype(data.dtype, np.floating)):
        raise GradnetError('batch CSR needs integer indptr and indices and '
                           f'float data, got {indptr.dtype}, {indices.dtype}'
                           f', {data.dtype}')
    row_nnz = np.diff(indptr.astype(np.int64))
    if (indptr[0] != 0 or np.any(row_nnz < 0)
            or indptr[-1] != len(indices) or len(indices) != len(data)):
        raise GradnetError(
            f'batch CSR is inconsistent: indptr must rise from 0 to nnz '
            f'({len(indices)} indices, {len(data)} values)')
    if len(indices) and (indices.min() < 0 or indices.max() >= n_columns):
        raise GradnetError(f'batch column indices must lie in [0, '
                           f'{n_columns}), got [{indices.min()}, '
                           f'{indices.max()}]')
    increasing = np.diff(indices.astype(np.int64)) > 0
    starts = indptr[1:-1]
    increasing[starts[(starts > 0) & (starts < len(indices))] - 1] = True
    if not increasing.all():
        raise GradnetError('batch column indices must be strictly increasing '
                           'within each row')
    if not np.isfinite(data).all():
        raise GradnetError('batch values contain NaN or infinity')
    meta = {}
    for name, values, dtype in (('sample', sample, np.int64),
                                ('candidate', candidate, np.int16),
                                ('target', target, np.int16)):
        values = _host(values)
        if values.shape != (rows,) or not np.issubdtype(values.dtype,
                                                        np.integer):
            raise GradnetError(f'{name} must be {rows} integers (one per '
                               f'row), got {values.dtype} {values.shape}')
        info = np.iinfo(dtype)
        if rows and (values.min() < info.min or values.max() > info.max):
            raise GradnetError(f'{name} values must fit {np.dtype(dtype)}')
        meta[name] = np.ascontiguousarray(values, dtype=dtype)
    return _Block(row_nnz, np.ascontiguousarray(indices, dtype=np.int32),
                  np.ascontiguousarray(data, dtype=np.float32), **meta)


# ----------------------------------------------------------------- writer --

class StoreWriter:
    """Appends batches to an extraction's journal and finalizes the store.

    Made by :meth:`TangentStore.create`, :meth:`TangentStore.resume` or
    :meth:`TangentStore.create_or_resume`. ``n_rows``: rows committed so far
    (the next append continues from there). Closing without
    :meth:`finalize` keeps the journal for a later resume.
    """

    def __init__(self, path, header, records, end, complete=False):
        self.path = Path(path)
        self.journal_path = _journal(self.path)
        self._header = header
        self._records = list(records)
        self.complete = complete
        self._file = None
        if not complete:
            self._file = open(self.journal_path, 'r+b')
            _lock(self._file, self.journal_path)
            self._file.truncate(end)
            self._file.seek(end)

    @property
    def n_columns(self):
        return self._header['n_columns']

    @property
    def layout(self):
        return self._header['layout']

    @property
    def provenance(self):
        return self._header['provenance']

    @property
    def total_rows(self):
        """Rows the finished store will hold, or None when not announced."""
        return self._header['total_rows']

    @property
    def n_rows(self):
        """Rows committed so far (all of them once complete)."""
        if self.complete:
            return self.total_rows
        return sum(r.rows for r in self._records)

    def append(self, csr, sample, candidate, target):
        """Commit one batch: ``csr`` a :class:`CSR` of ``rows`` rows (NumPy
        or CuPy arrays; copied to the host here), ``sample`` (int, < 2**63),
        ``candidate`` and ``target`` (int16 range), each ``(rows,)``.
        The batch is durable against a killed process when this returns."""
        if self._file is None:
            raise GradnetError(f'{self.path}: the writer is closed or the '
                               'store is already finalized')
        block = _check_batch(csr, sample, candidate, target, self.n_columns)
        rows, nnz = len(block.sample), len(block.indices)
        if self.total_rows is not None \
                and self.n_rows + rows > self.total_rows:
            raise GradnetError(
                f'{self.path}: appending {rows} rows to {self.n_rows} would '
                f'exceed the announced {self.total_rows}')
        arrays = [getattr(block, name) for name, _, _ in _RECORD_FIELDS]
        padding = bytes(_pad8(20 * rows + 8 * nnz))
        crc = 0
        for array in arrays:
            crc = zlib.crc32(memoryview(array).cast('B'), crc)
        crc = zlib.crc32(padding, crc)
        head = _RECORD_HEAD.pack(_RECORD_MAGIC, rows, nnz, crc, 0)[:-4]
        start = self._file.tell()
        try:
            self._file.write(head + struct.pack('<I', zlib.crc32(head)))
            for array in arrays:
                self._file.write(memoryview(array).cast('B'))
            self._file.write(padding)
            self._file.flush()
        except BaseException:
            self._drop_tail(start)
            raise
        self._records.append(_Record(start + _RECORD_HEAD.size, rows, nnz))

    def _drop_tail(self, start):
        """Cut a record whose write failed (disk full, interrupt) so that
        later appends follow the last complete one; close the writer if
        even that fails."""
        try:
            self._file.seek(start)
            self._file.truncate(start)
        except OSError:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass   # the write's own error is the one to report

    def finalize(self):
        """Write the HDF5 store at ``path`` from the journal, then delete the
        journal. Refuses while rows announced by ``total_rows`` are missing.
        Returns ``path``; a no-op for a store that is already complete."""
        if self.complete:
            return self.path
        if self._file is None:
            raise GradnetError(f'{self.path}: the writer is closed')
        if self.total_rows is not None and self.n_rows != self.total_rows:
            raise GradnetError(_incomplete_message(self.path, self.n_rows,
                                                   self.total_rows))
        tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        mapping = np.memmap(self.journal_path, np.uint8, 'r')
        try:
            _write_h5(tmp, self._header, self.n_rows,
                      sum(r.nnz for r in self._records),
                      self._journal_blocks(mapping))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _install(tmp, self.path)
        self.journal_path.unlink()
        self.close()
        self._header['total_rows'] = self.n_rows
        self.complete = True
        return self.path

    def _journal_blocks(self, mapping):
        """The journal's records as :class:`_Block`s, CRCs checked again."""
        for record in self._records:
            payload = mapping[record.offset:record.offset
                              + _payload_size(record.rows, record.nnz)]
            head = mapping[record.offset - _RECORD_HEAD.size:record.offset]
            expected = _RECORD_HEAD.unpack(head.tobytes())[3]
            if zlib.crc32(payload) != expected:
                raise GradnetError(
                    f'{self.journal_path}: a committed batch changed on disk '
                    '(CRC mismatch); the partial file is corrupt, delete it '
                    'to restart')
            yield _record_arrays(mapping, record)

    def close(self):
        """Release the journal (without finalizing: it can be resumed)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _journal(path):
    return path.with_name(path.name + JOURNAL_SUFFIX)


def _incomplete_message(path, n_rows, total_rows):
    of = f'{n_rows} of {total_rows}' if total_rows is not None \
        else f'{n_rows} (of an unannounced number of)'
    return (f'{path}: extraction incomplete: {of} rows; re-run the same '
            'command to resume')


# ----------------------------------------------------------------- reader --

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
    """Row access to an unfinished extraction's journal (read-only)."""

    def __init__(self, path):
        self.path = path
        self.header, records, _ = _scan_journal(path)
        self.complete = False
        self.mapping = np.memmap(path, np.uint8, 'r') if records else None
        blocks = [_record_arrays(self.mapping, r) for r in records]
        self.nnz_starts = np.cumsum([0] + [r.nnz for r in records])
        self.blocks = blocks
        self.indptr = np.concatenate(
            [[0]] + [b.row_nnz for b in blocks]).cumsum()
        for name in ('sample', 'candidate', 'target'):
            dtype = np.int64 if name == 'sample' else np.int16
            setattr(self, name, np.concatenate(
                [np.zeros(0, dtype)] + [getattr(b, name) for b in blocks]))

    def values(self, start, stop):
        first = np.searchsorted(self.nnz_starts, start, side='right') - 1
        indices, data = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
        for k in range(max(first, 0), len(self.blocks)):
            base = self.nnz_starts[k]
            if base >= stop:
                break
            a, b = max(start - base, 0), min(stop - base,
                                             len(self.blocks[k].indices))
            indices.append(self.blocks[k].indices[a:b])
            data.append(self.blocks[k].data[a:b])
        return np.concatenate(indices), np.concatenate(data)

    def column_stats(self):
        stats = ColumnStats(self.header['n_columns'])
        for block in self.blocks:
            stats.add_entries(block.indices, block.data)
        return stats.as_dict()

    def close(self):
        self.blocks = []
        self.mapping = None


class TangentStore:
    """Read access to a tangent store; also the entry point for writing.

    Reading: :meth:`open`. Writing: :meth:`create`, :meth:`resume`,
    :meth:`create_or_resume` (each returns a :class:`StoreWriter`), then
    :meth:`StoreWriter.finalize`. All rows come back as NumPy arrays.
    """

    def __init__(self, path, rows):
        self.path = Path(path)
        self._rows = rows

    # -- opening and creating --

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

    @classmethod
    def create(cls, path, n_columns, layout, provenance, total_rows=None,
               compression=DEFAULT_COMPRESSION,
               chunk_elements=DEFAULT_CHUNK_ELEMENTS):
        """Start a new extraction into ``path``; returns a StoreWriter.

        ``layout``: JSON-able dict describing the columns (link names,
        shapes, offsets, ``block_sizes`` — which must then sum to
        ``n_columns``). ``provenance``: JSON-able dict (model checksum,
        dataset, split, q, candidate mode, seed, ``shard``: ``[i, n]`` for a
        shard); ``package_version`` and ``created`` are added here.
        ``total_rows``: rows the store will hold, when known (finalize then
        checks it). ``compression``: ``gzip`` | ``lzf`` | ``none``;
        ``chunk_elements``: HDF5 chunk length of the nonzero datasets.
        Refuses when ``path`` or its journal exists.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise GradnetError(f'{path}: directory {path.parent} does not '
                               'exist')
        for existing in (path, _journal(path)):
            if existing.exists():
                raise GradnetError(f'{existing} already exists: resume the '
                                   'extraction or remove it first')
        header = _new_header(n_columns, layout, provenance, total_rows,
                             _storage(compression, chunk_elements))
        journal = _journal(path)
        _write_journal_header(journal, header)
        _, records, end = _scan_journal(journal)
        return StoreWriter(path, header, records, end)

    @classmethod
    def resume(cls, path, expected_provenance, n_columns=None, layout=None,
               total_rows=None):
        """Reopen an unfinished extraction: ``(writer, committed_rows)``.

        Cuts off a batch torn by a crash. Refuses (GradnetError) when the
        journal belongs to a different extraction: provenance (all keys but
        ``created``; ``package_version`` is compared with this package's),
        and, when given, ``n_columns``, ``layout`` or ``total_rows`` differ.
        """
        path = Path(path)
        journal = _journal(path)
        if not journal.exists():
            raise GradnetError(f'{path}: no unfinished extraction to resume '
                               f'({journal.name} does not exist)')
        header, records, end = _scan_journal(journal)
        expected = _new_header(
            header['n_columns'] if n_columns is None else n_columns,
            header['layout'] if layout is None else layout,
            expected_provenance,
            header['total_rows'] if total_rows is None else total_rows,
            header['storage'])
        _check_same_extraction(journal, header, expected)
        writer = StoreWriter(path, header, records, end)
        return writer, writer.n_rows

    @classmethod
    def create_or_resume(cls, path, n_columns, layout, provenance,
                         total_rows=None, compression=DEFAULT_COMPRESSION,
                         chunk_elements=DEFAULT_CHUNK_ELEMENTS):
        """The extraction's entry point: a StoreWriter whose ``n_rows`` says
        where to continue. Creates the store, resumes an unfinished one of
        the same extraction, or returns an already ``complete`` writer when
        the same extraction is finished. Refuses to touch a different one.
        """
        path = Path(path)
        expected = _new_header(n_columns, layout, provenance, total_rows,
                               _storage(compression, chunk_elements))
        if path.exists():
            with cls.open(path) as store:
                found = {'n_columns': store.n_columns, 'layout': store.layout,
                         'provenance': store.provenance,
                         'total_rows': len(store)}
            _check_same_extraction(path, found, expected)
            _journal(path).unlink(missing_ok=True)
            return StoreWriter(path, {**expected, **found}, [], 0,
                               complete=True)
        if _journal(path).exists():
            return cls.resume(path, provenance, n_columns, layout,
                              total_rows)[0]
        return cls.create(path, n_columns, layout, provenance, total_rows,
                          compression, chunk_elements)

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
        in that order. Reads each run of consecutive stored rows at once."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(
                rows.dtype, np.integer)):
            raise GradnetError(f'row indices must be a 1-D integer array, '
                               f'got {rows.dtype} {rows.shape}')
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise GradnetError(f'row indices must lie in [0, {len(self)}), '
                               f'got [{rows.min()}, {rows.max()}]')
        rows = rows.astype(np.int64)
        unique = np.unique(rows)
        runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1)
        pieces = [self._rows.values(self._rows.indptr[run[0]],
                                    self._rows.indptr[run[-1] + 1])
                  for run in runs if run.size]
        indices = np.concatenate([np.zeros(0, np.int32)]
                                 + [p[0] for p in pieces])
        data = np.concatenate([np.zeros(0, np.float32)]
                              + [p[1] for p in pieces])
        lengths = np.diff(self._rows.indptr)[unique]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        position = np.searchsorted(unique, rows)
        if not np.array_equal(position, np.arange(len(unique))):
            lengths = lengths[position]
            ends = np.cumsum(lengths)
            gather = (np.arange(ends[-1] if len(ends) else 0)
                      + np.repeat(starts[position] - (ends - lengths),
                                  lengths))
            indices, data = indices[gather], data[gather]
            starts = np.concatenate([[0], ends])
        return self._batch(starts, indices, data, rows)

    def _batch(self, indptr, indices, data, rows):
        csr = CSR(indptr.astype(np.int64), indices, data,
                  (len(indptr) - 1, self.n_columns))
        return Batch(csr, self._rows.sample[rows].copy(),
                     self._rows.candidate[rows].copy(),
                     self._rows.target[rows].copy())

    def iter_batches(self, batch_size, shuffle=False, seed=0,
                     group_by_sample=False):
        """Yield Batches covering every row once.

        Sequential by default; ``shuffle`` permutes with
        ``numpy.random.default_rng(seed)`` (same seed, same batches).
        ``group_by_sample``: every batch holds all rows of ``batch_size``
        samples (groups in order of first appearance, shuffled as wholes
        when ``shuffle``; rows of a group in stored order) — for the
        all-candidates prediction. Otherwise ``batch_size`` counts rows; the
        last batch may be smaller.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise GradnetError(f'batch size must be a positive integer, got '
                               f'{batch_size!r}')
        batch_size = int(batch_size)
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


def _new_header(n_columns, layout, provenance, total_rows, storage):
    """The JSON header of a new extraction (checks its arguments)."""
    if int(n_columns) != n_columns or n_columns < 1:
        raise GradnetError(f'n_columns must be a positive integer, got '
                           f'{n_columns!r}')
    if total_rows is not None and (int(total_rows) != total_rows
                                   or total_rows < 0):
        raise GradnetError(f'total_rows must be a non-negative integer or '
                           f'None, got {total_rows!r}')
    if not isinstance(layout, dict) or not isinstance(provenance, dict):
        raise GradnetError('layout and provenance must be dicts')
    layout = _jsonable(layout, 'layout')
    if 'block_sizes' in layout and sum(layout['block_sizes']) != n_columns:
        raise GradnetError(f"layout block_sizes sum to "
                           f"{sum(layout['block_sizes'])}, not n_columns = "
                           f'{n_columns}')
    provenance = _jsonable(provenance, 'provenance')
    reserved = [k for k in _RESERVED_PROVENANCE if k in provenance]
    if reserved:
        raise GradnetError(f"provenance keys {', '.join(reserved)} are "
                           'filled in by the store')
    provenance['package_version'] = __version__
    provenance['created'] = datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec='seconds')
    return {'n_columns': int(n_columns), 'layout': layout,
            'provenance': provenance,
            'total_rows': None if total_rows is None else int(total_rows),
            'storage': storage}


def _check_same_extraction(path, found, expected):
    """GradnetError unless ``found`` and ``expected`` (header-like dicts)
    describe the same extraction (an expected ``total_rows`` of None
    matches any)."""
    problems = []
    for key in ('n_columns', 'total_rows', 'layout'):
        if found[key] != expected[key] and not (
                key == 'total_rows' and expected[key] is None):
            problems.append(f'{key}: {found[key]!r} (expected '
                            f'{expected[key]!r})')
    provenance = _differences(_identity(found['provenance']),
                              _identity(expected['provenance']))
    if provenance:
        problems.append(f'provenance differs in {provenance}')
    if problems:
        raise GradnetError(
            f'{path} holds a different extraction; refusing to overwrite it '
            f"(choose another output or delete it): {'; '.join(problems)}")


# ------------------------------------------------------------------ merge --

def merge(shard_paths, out_path, compression=None, chunk_elements=None,
          rows_per_block=4096):
    """Join the finished shards of one extraction into the store
    ``out_path``; returns its path.

    Every shard's provenance has ``shard``: ``[i, n]``; all ``n`` shards must
    be given (any order), with the same layout, columns and provenance
    otherwise. Rows follow shard index order; the result's provenance is the
    shards' without ``shard`` (and a new ``created``), and the root
    attribute ``merged_from`` lists the shard files. ``compression`` and
    ``chunk_elements`` default to the first shard's.
    """
    out_path = Path(out_path)
    for existing in (out_path, _journal(out_path)):
        if existing.exists():
            raise GradnetError(f'{existing} already exists: refusing to '
                               'overwrite it with the merge')
    if not shard_paths:
        raise GradnetError('merge needs at least one shard')
    stores = []
    try:
        for shard_path in shard_paths:
            stores.append(TangentStore.open(shard_path))
        stores = _order_shards(stores)
        first = stores[0]
        storage = _storage(compression or first.storage['compression'],
                           chunk_elements or first.storage['chunk_elements'])
        provenance = {k: v for k, v in first.provenance.items()
                      if k not in (SHARD_KEY, 'created')}
        provenance['created'] = datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec='seconds')
        header = {'n_columns': first.n_columns, 'layout': first.layout,
                  'provenance': provenance, 'storage': storage}
        sources = [{'file': str(s.path),
                    'created': s.provenance.get('created'),
                    'rows': len(s)} for s in stores]
        tmp = out_path.with_name(out_path.name + TMP_SUFFIX)
        try:
            _write_h5(tmp, header, sum(len(s) for s in stores),
                      sum(s.nnz for s in stores),
                      _store_blocks(stores, rows_per_block),
                      {'merged_from': json.dumps(sources)})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _install(tmp, out_path)
    finally:
        for store in stores:
            store.close()
    return out_path


def _order_shards(stores):
    """The shard stores sorted by shard index, after checking that they are
    all ``n`` shards of one extraction."""
    marks = []
    for store in stores:
        mark = store.provenance.get(SHARD_KEY)
        if not (isinstance(mark, list) and len(mark) == 2
                and all(isinstance(v, int) for v in mark)):
            raise GradnetError(f'{store.path}: not a shard (its provenance '
                               f'has no {SHARD_KEY!r}: [i, n])')
        marks.append(tuple(mark))
    n = marks[0][1]
    if sorted(marks) != [(i, n) for i in range(n)]:
        raise GradnetError(f'merge needs each of the {n} shards exactly '
                           f'once, got shards {sorted(marks)}')
    stores = [s for _, s in sorted(zip(marks, stores), key=lambda p: p[0])]
    reference = stores[0]
    common = {k: v for k, v in _identity(reference.provenance).items()
              if k != SHARD_KEY}
    for store in stores[1:]:
        mine = {k: v for k, v in _identity(store.provenance).items()
                if k != SHARD_KEY}
        problems = _differences(mine, common)
        if store.n_columns != reference.n_columns \
                or store.layout != reference.layout:
            problems = 'layout or column count; ' + problems
        if problems:
            raise GradnetError(f'{store.path} is not a shard of the same '
                               f'extraction as {reference.path}: {problems}')
    return stores


def _store_blocks(stores, rows_per_block):
    """The rows of ``stores`` in order, as :class:`_Block`s."""
    for store in stores:
        for start in range(0, len(store), rows_per_block):
            csr, sample, candidate, target = store.read(
                start, min(start + rows_per_block, len(store)))
            yield _Block(np.diff(csr.indptr), csr.indices, csr.data, sample,
                         candidate, target)
