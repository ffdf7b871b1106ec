"""Merging shards: :func:`merge` joins the finished shard stores of one
extraction (``extract --shard i/n``) into one store, as if extracted at
once. One writer at a time: it holds ``out_path``'s writer lock like an
extraction.

Neighbours: reads the shards with :class:`~.reader.TangentStore`, writes the
result with :mod:`.format`'s HDF5 writer and atomic install (no journal: a
merge is redone from the shards when killed), checks the shards' identity
the way :mod:`.writer` checks a resumed extraction (:mod:`.format`'s
provenance helpers).
"""
import json
from pathlib import Path

import numpy as np

from gradnet_cupy.errors import GradnetError, naming
from gradnet_cupy.store.format import (
    SHARD_KEY, TMP_SUFFIX, _Block, _created_now, _differences, _identity,
    _install, _journal, _storage, _write_h5, _WriterLock)
from gradnet_cupy.store.reader import TangentStore


def merge(shard_paths, out_path, compression=None, chunk_elements=None,
          rows_per_block=None):
    """Join the finished shards of one extraction into the store
    ``out_path``; returns its path.

    Every shard's provenance has ``shard``: ``[i, n]``; all ``n`` shards must
    be given (any order), with the same layout, columns and provenance
    otherwise. Rows follow shard index order; the result's provenance is the
    shards' without ``shard`` (and a new ``created``), and the root
    attribute ``merged_from`` lists the shard files. ``compression`` and
    ``chunk_elements`` default to the first shard's. ``rows_per_block``:
    rows read (and held in memory) at a time; by default the rows of one
    extraction batch where the provenance records it
    (:func:`_extraction_rows`), so that the column statistics add up in the
    order of a single-process finalize (bit-identical float64 sums), else
    256 (256 rows of 135,360 columns at 15% density are 42 MB).
    """
    out_path = Path(out_path)
    if not shard_paths:
        raise GradnetError('merge needs at least one shard')
    lock = _WriterLock(out_path)
    stores = []
    try:
        for existing in (out_path, _journal(out_path)):
            if existing.exists():
                raise GradnetError(f'{existing} already exists: refusing to '
                                   'overwrite it with the merge')
        for shard_path in shard_paths:
            stores.append(TangentStore.open(shard_path))
        stores = _order_shards(stores)
        first = stores[0]
        storage = _storage(compression or first.storage['compression'],
                           chunk_elements or first.storage['chunk_elements'])
        provenance = {k: v for k, v in first.provenance.items()
                      if k not in (SHARD_KEY, 'created')}
        provenance['created'] = _created_now()
        header = {'n_columns': first.n_columns, 'layout': first.layout,
                  'provenance': provenance, 'storage': storage}
        sources = [{'file': str(s.path),
                    'created': s.provenance.get('created'),
                    'rows': len(s)} for s in stores]
        tmp = out_path.with_name(out_path.name + TMP_SUFFIX)
        try:
            with naming(tmp):
                _write_h5(tmp, header, sum(len(s) for s in stores),
                          sum(s.nnz for s in stores),
                          _store_blocks(stores, rows_per_block or
                                        _extraction_rows(provenance)),
                          {'merged_from': json.dumps(sources)})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _install(tmp, out_path)
    finally:
        for store in stores:
            store.close()
        lock.release()
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


def _extraction_rows(provenance, default=256):
    """Rows per journal record of an extraction with ``provenance`` (its
    ``batch`` of samples, times ``n_classes`` rows per sample for
    ``candidates: 'all'``); ``default`` when it records no batch."""
    batch = provenance.get('batch')
    if not isinstance(batch, int) or batch < 1:
        return default
    if provenance.get('candidates') == 'all':
        return batch * int(provenance.get('n_classes', 1))
    return batch


def _store_blocks(stores, rows_per_block):
    """The rows of ``stores`` in order, as :class:`_Block`s."""
    for store in stores:
        for start in range(0, len(store), rows_per_block):
            csr, sample, candidate, target = store.read(
                start, min(start + rows_per_block, len(store)))
            yield _Block(np.diff(csr.indptr), csr.indices, csr.data, sample,
                         candidate, target)
