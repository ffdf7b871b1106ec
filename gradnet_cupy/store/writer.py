"""Writing a tangent store: :class:`StoreWriter`, the one way to make one.

Its job is the crash-safe, two-phase write (docs/store.rst):

1. :meth:`StoreWriter.append` checks a batch and commits it as one record of
   the append-only journal ``PATH.partial`` (flushed before it returns). A
   process killed in the middle of a write leaves a torn tail that the next
   :meth:`StoreWriter.resume` (or :meth:`StoreWriter.create_or_resume`)
   cuts off: the extraction goes on from the last complete batch, without
   duplicating or losing rows.
2. :meth:`StoreWriter.finalize` converts the journal into the HDF5 file
   (chunked, compressed, per-chunk Fletcher-32 checksums; the column
   statistics are accumulated while writing) under ``PATH.tmp``, flushes it
   to disk, renames it to ``PATH`` atomically and deletes the journal.

One writer per store: every way of opening a writer first takes the
exclusive lock ``PATH.lock`` (:class:`~.format._WriterLock`, an OS lock
dropped when the process dies) and holds it until the writer is closed or
finalized; a second process gets a GradnetError.

Hence a file at ``PATH`` is always a finished store. A kill during finalize
leaves the journal intact and finalize is simply redone. Power loss (not
just a killed process) can lose the journal's recent, unsynced records,
which the CRCs detect like a torn tail.

Neighbours: :mod:`.format` (the bytes of the journal and of the HDF5 file),
:mod:`.reader` (:class:`~.reader.TangentStore`, which reads what this
writes; :meth:`StoreWriter.create_or_resume` opens a finished store with it
to compare extractions), :mod:`.merge`.

Typical use by an extraction (``rows`` in a fixed, reproducible order)::

    writer = StoreWriter.create_or_resume(out, n_columns, layout,
                                          provenance, total_rows=len(rows))
    for start in range(writer.n_rows, len(rows), batch):
        csr = percentile_sparsify(tangents(rows[start:start + batch]), ...)
        writer.append(csr, sample, candidate, target)
    writer.finalize()
"""
from pathlib import Path

import numpy as np

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.errors import GradnetError, naming
from gradnet_cupy.kernels.csr import check_csr
from gradnet_cupy.store.format import (
    DEFAULT_CHUNK_ELEMENTS, DEFAULT_COMPRESSION, TMP_SUFFIX, _Block,
    _check_same_extraction, _incomplete_message, _install, _journal,
    _new_header, _read_record, _Record, _RECORD_HEAD, _record_pieces,
    _scan_journal, _storage, _write_h5, _write_journal_header, _WriterLock)
from gradnet_cupy.store.reader import TangentStore


# ------------------------------------------------------------ validation --

def _check_batch(csr, sample, candidate, target, n_columns):
    """Host copies of one appended batch as a :class:`_Block`, after checking
    it (GradnetError naming the problem): the CSR structure by
    :func:`check_csr`, then what the store adds: finite values, and
    ``sample``, ``candidate``, ``target`` one integer per row within the
    range of their stored dtypes (int64, int16, int16)."""
    check_csr(csr, n_columns)
    indptr, indices, data = (to_numpy(csr.indptr), to_numpy(csr.indices),
                             to_numpy(csr.data))
    rows = len(indptr) - 1
    if not np.isfinite(data).all():
        raise GradnetError('batch values contain NaN or infinity')
    meta = {}
    for name, values, dtype in (('sample', sample, np.int64),
                                ('candidate', candidate, np.int16),
                                ('target', target, np.int16)):
        values = to_numpy(values)
        if values.shape != (rows,) or not np.issubdtype(values.dtype,
                                                        np.integer):
            raise GradnetError(f'{name} must be {rows} integers (one per '
                               f'row), got {values.dtype} {values.shape}')
        info = np.iinfo(dtype)
        if rows and (values.min() < info.min or values.max() > info.max):
            raise GradnetError(f'{name} values must fit {np.dtype(dtype)}')
        meta[name] = np.ascontiguousarray(values, dtype=dtype)
    return _Block(np.diff(indptr), np.ascontiguousarray(indices),
                  np.ascontiguousarray(data), **meta)


# ---------------------------------------------------------------- journal --

def _new_journal(path, header):
    """Create the journal of a new extraction of ``path`` (refused when
    ``path`` or its journal exists): ``(header, records, end, False)``."""
    for existing in (path, _journal(path)):
        if existing.exists():
            raise GradnetError(f'{existing} already exists: resume the '
                               'extraction or remove it first')
    with naming(_journal(path)):
        _write_journal_header(_journal(path), header)
    _, records, end = _scan_journal(_journal(path))
    return header, records, end, False


def _reopen_journal(path, expected_provenance, n_columns, layout,
                    total_rows):
    """The committed records of ``path``'s journal after checking that it
    is the expected extraction: ``(header, records, end, False)``."""
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
    return header, records, end, False


# ----------------------------------------------------------------- writer --

class StoreWriter:
    """Appends batches to an extraction's journal and finalizes the store.

    Made by :meth:`create`, :meth:`resume` or :meth:`create_or_resume`.
    ``n_rows``: rows committed so far (the next append continues from
    there). Closing without :meth:`finalize` keeps the journal for a later
    resume.
    """

    def __init__(self, path, header, records, end, complete, lock):
        self.path = Path(path)
        self.journal_path = _journal(self.path)
        self._header = header
        self._records = list(records)
        self.complete = complete
        self._file = None
        self._lock = lock
        if complete:
            lock.release()
            return
        try:
            self._file = open(self.journal_path, 'r+b')
            self._file.truncate(end)
            self._file.seek(end)
        except BaseException:
            self.close()
            raise

    @classmethod
    def _locked(cls, path, opening):
        """A writer of ``path`` made by ``opening() -> (header, records,
        end, complete)`` while holding the store's writer lock (kept by the
        writer until it is closed or finalized)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise GradnetError(f'{path}: directory {path.parent} does not '
                               'exist')
        lock = _WriterLock(path)
        try:
            return cls(path, *opening(), lock)
        except BaseException:
            lock.release()
            raise

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
        Refuses when ``path`` or its journal exists, or when another process
        writes ``path`` (see :class:`~.format._WriterLock`).
        """
        path = Path(path)
        header = _new_header(n_columns, layout, provenance, total_rows,
                             _storage(compression, chunk_elements))
        return cls._locked(path, lambda: _new_journal(path, header))

    @classmethod
    def resume(cls, path, expected_provenance, n_columns=None, layout=None,
               total_rows=None):
        """Reopen an unfinished extraction: ``(writer, committed_rows)``.

        Cuts off a batch torn by a crash. Refuses (GradnetError) when the
        journal belongs to a different extraction: provenance (all keys but
        ``created``; ``package_version`` is compared with this package's),
        and, when given, ``n_columns``, ``layout`` or ``total_rows`` differ.
        """
        writer = cls._locked(path, lambda: _reopen_journal(
            Path(path), expected_provenance, n_columns, layout, total_rows))
        return writer, writer.n_rows

    @classmethod
    def create_or_resume(cls, path, n_columns, layout, provenance,
                         total_rows=None, compression=DEFAULT_COMPRESSION,
                         chunk_elements=DEFAULT_CHUNK_ELEMENTS):
        """The extraction's entry point: a StoreWriter whose ``n_rows`` says
        where to continue. Creates the store, resumes an unfinished one of
        the same extraction, or returns an already ``complete`` writer when
        the same extraction is finished. Refuses to touch a different one,
        or one that another process is writing.
        """
        path = Path(path)
        expected = _new_header(n_columns, layout, provenance, total_rows,
                               _storage(compression, chunk_elements))

        def opening():
            if path.exists():
                with TangentStore.open(path) as store:
                    found = {'n_columns': store.n_columns,
                             'layout': store.layout,
                             'provenance': store.provenance,
                             'total_rows': len(store)}
                _check_same_extraction(path, found, expected)
                _journal(path).unlink(missing_ok=True)
                return {**expected, **found}, [], 0, True
            if _journal(path).exists():
                return _reopen_journal(path, provenance, n_columns, layout,
                                       total_rows)
            return _new_journal(path, expected)
        return cls._locked(path, opening)

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
        """Commit one batch: ``csr`` a :class:`CSR` of ``rows`` rows and
        ``n_columns`` columns (indptr int64, indices int32, data float32;
        NumPy or CuPy arrays, copied to the host here), ``sample`` (int,
        < 2**63), ``candidate`` and ``target`` (int16 range), each
        ``(rows,)`` integer arrays or lists.
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
        start = self._file.tell()
        try:
            with naming(self.journal_path):
                for piece in _record_pieces(block):
                    self._file.write(piece)
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
        try:
            with naming(tmp), open(self.journal_path, 'rb') as journal:
                _write_h5(tmp, self._header, self.n_rows,
                          sum(r.nnz for r in self._records),
                          (_read_record(journal, record, self.journal_path)
                           for record in self._records))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _install(tmp, self.path)
        self.journal_path.unlink()
        self.close()
        self._header['total_rows'] = self.n_rows
        self.complete = True
        return self.path

    def close(self):
        """Release the journal and the writer lock (without finalizing: the
        journal can be resumed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
