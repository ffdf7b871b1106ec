"""The on-disk format of the tangent store (docs/store.rst): its one job is to
say what the bytes are, for the writer, the reader and the merge.

Neighbours: :mod:`.writer` (StoreWriter: the journal and finalize),
:mod:`.reader` (TangentStore), :mod:`.merge` (joining shards) all build on
the constants and helpers here; nothing here opens a store for its user.

The finished store, one HDF5 file (``h5py``; readable without
gradnet-cupy)::

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

written by :func:`_write_h5` under ``PATH.tmp`` and put in place by
:func:`_install` (an atomic rename).

The journal of an unfinished extraction, ``PATH.partial``: a header
``[magic 8s, version u32, length u32, CRC32 u32][JSON header]`` padded to 8
bytes, then records ``[magic 4s, rows u32, nnz u64, payload CRC32 u32,
header CRC32 u32][payload]``; the payload holds row_nnz int64 (rows,),
sample int64 (rows,), indices int32 (nnz,), data float32 (nnz,), candidate
int16 (rows,), target int16 (rows,), padded to 8 bytes. A record counts only
when both CRCs match (:func:`_scan_journal`); whatever follows the last such
record is a torn tail.

The JSON header (:func:`_new_header`): ``n_columns``, ``layout``,
``provenance`` (``package_version`` and ``created`` filled in here),
``total_rows`` (or None), ``storage`` (:func:`_storage`).
"""
import datetime
import hashlib
import json
import os
import shutil
import struct
import zlib
from typing import NamedTuple

import h5py
import hdf5plugin
import numpy as np

from gradnet_cupy import __version__
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.normalize import ColumnStats

try:
    import resource
except ImportError:   # not POSIX: no file size limit to respect
    resource = None

FORMAT = 'gradnet-cupy tangent store'
FORMAT_VERSION = 1
JOURNAL_SUFFIX = '.partial'
TMP_SUFFIX = '.tmp'
LOCK_SUFFIX = '.lock'
SHARD_KEY = 'shard'

# Blosc2 (HDF5 filter 32026 from the hdf5plugin package, which the reader
# imports: any h5py reads these stores after ``import hdf5plugin``) with its
# byte shuffle, then Zstandard level 1 or LZ4; gzip (level 1 + shuffle)
# and lzf (h5py's own filters) and none stay selectable. The default was
# chosen from bench/results/store-cpu.json (docs/benchmarks.rst).
COMPRESSIONS = ('blosc2-zstd', 'blosc2-lz4', 'gzip', 'lzf', 'none')
DEFAULT_COMPRESSION = 'blosc2-zstd'
_BLOSC2_LEVELS = {'zstd': 1, 'lz4': 5}
DEFAULT_CHUNK_ELEMENTS = 1 << 14
_RESERVED_PROVENANCE = ('package_version', 'created')
_CHUNK_CACHE_BYTES = 16 << 20


class _Block(NamedTuple):
    """Rows on their way to the HDF5 file: ``row_nnz`` int64 (rows,) and
    the columns of :class:`~.reader.Batch` as flat NumPy arrays."""
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


def _created_now():
    """The ``created`` of a new store's provenance: the UTC time now, ISO
    8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds')


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
    compression = storage['compression']
    blosc2 = compression.startswith('blosc2-')
    options = {'chunks': (storage['chunk_elements'],), 'maxshape': (None,),
               'shuffle': storage['shuffle'] and not blosc2,
               'fletcher32': storage['fletcher32']}
    if blosc2:   # Blosc2 shuffles the bytes itself
        cname = compression[len('blosc2-'):]
        options.update(hdf5plugin.Blosc2(
            cname=cname, clevel=_BLOSC2_LEVELS[cname],
            filters=hdf5plugin.Blosc2.SHUFFLE))
    elif compression == 'gzip':
        options.update(compression='gzip', compression_opts=1)
    elif compression == 'lzf':
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


def _record_pieces(block):
    """The bytes of the journal record of the :class:`_Block` ``block``, as
    the buffers to write in order: the record header (CRCs included), each
    payload array, the padding."""
    rows, nnz = len(block.sample), len(block.indices)
    arrays = [memoryview(getattr(block, name)).cast('B')
              for name, _, _ in _RECORD_FIELDS]
    padding = bytes(_pad8(20 * rows + 8 * nnz))
    crc = 0
    for array in arrays:
        crc = zlib.crc32(array, crc)
    crc = zlib.crc32(padding, crc)
    head = _RECORD_HEAD.pack(_RECORD_MAGIC, rows, nnz, crc, 0)[:-4]
    return [head + struct.pack('<I', zlib.crc32(head))] + arrays + [padding]


def _read_record(file, record, path):
    """The :class:`_Block` of a committed ``record`` of the journal ``path``
    (open as the binary ``file``), read into memory of its own after
    checking its payload CRC again (GradnetError when it changed on disk).

    Read, not memory-mapped: the pages of a mapped journal stay resident
    (and counted in the process's RSS) until it is unmapped, so a pass over
    a mapped journal holds all of it, while this holds one record."""
    buffer = bytearray(_RECORD_HEAD.size
                       + _payload_size(record.rows, record.nnz))
    file.seek(record.offset - _RECORD_HEAD.size)
    payload = memoryview(buffer)[_RECORD_HEAD.size:]
    if file.readinto(buffer) != len(buffer) or zlib.crc32(payload) \
            != _RECORD_HEAD.unpack_from(buffer)[3]:
        raise GradnetError(
            f'{path}: a committed batch changed on disk (CRC mismatch); the '
            'partial file is corrupt, delete it to restart')
    return _record_arrays(buffer, record._replace(offset=_RECORD_HEAD.size))


def _journal(path):
    """The journal path ``PATH.partial`` of the store path ``path``."""
    return path.with_name(path.name + JOURNAL_SUFFIX)


def _incomplete_message(path, n_rows, total_rows):
    of = f'{n_rows} of {total_rows}' if total_rows is not None \
        else f'{n_rows} (of an unannounced number of)'
    return (f'{path}: extraction incomplete: {of} rows; re-run the same '
            'command to resume')


class _WriterLock:
    """The one-writer rule of the store ``path``: an exclusive ``flock`` on
    ``PATH.lock``, taken before anything at ``path`` is looked at and held
    until :meth:`release` (or the process dies: the OS drops the lock, so a
    killed run never blocks the next). GradnetError when another process
    holds it. Where there is no ``fcntl`` (not POSIX) the lock file is
    created with ``O_EXCL`` instead."""

    def __init__(self, path):
        self.path = path.with_name(path.name + LOCK_SUFFIX)
        try:
            import fcntl
        except ImportError:
            fcntl = None
        while True:
            flags = os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL)
            try:
                self._fd = os.open(self.path, flags, 0o644)
                if fcntl:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, FileExistsError):
                if fcntl:
                    os.close(self._fd)
                raise GradnetError(
                    f'{path} is being written by another process (it holds '
                    f'{self.path.name}); wait for it to finish') from None
            # the holder before us may have removed the file meanwhile
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self._fd)

    def release(self):
        """Remove the lock file, then drop the lock (idempotent)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- header --

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
    provenance['created'] = _created_now()
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


# ------------------------------------------------------------ HDF5 writer --

def _check_room(path, n_rows, nnz, n_columns):
    """GradnetError unless the file system of ``path`` has room for a store
    of this size, and the process's file size limit (``ulimit -f``) allows
    it: at most its uncompressed bytes, plus 1% and 1 MiB for chunk
    headers and metadata. Checked before writing because HDF5 cannot
    recover from a failed write (h5py may even crash on closing such a
    file)."""
    needed = int(1.01 * (8 * nnz + 28 * n_rows + 40 * n_columns)) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    room, where = free, f'{free / 1e6:.1f} MB free in {path.parent}'
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource \
        else None
    if limit not in (None, getattr(resource, 'RLIM_INFINITY', None)) \
            and limit < free:
        room, where = limit, f'the file size limit is {limit / 1e6:.1f} MB'
    if room < needed:
        raise GradnetError(
            f'{path}: not enough room for the store: it needs up to '
            f'{needed / 1e6:.1f} MB and {where}; free some space and run '
            'the command again')


def _write_h5(path, header, n_rows, nnz, blocks, extra_attrs=None):
    """Write a complete store at ``path`` from ``blocks`` (:class:`_Block`s
    holding ``n_rows`` rows and ``nnz`` nonzeros in all), then flush it to
    disk. The column statistics are accumulated on the way. Refuses
    (:func:`_check_room`) when the disk cannot hold it."""
    n_columns = header['n_columns']
    _check_room(path, n_rows, nnz, n_columns)
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
