"""The tangent store: sparse CSR tangent features in one HDF5 file
(docs/store.rst), written crash-safely through a journal.

Modules, one job each:

- :mod:`.format`  the on-disk format: HDF5 layout, journal records, header
  checks, atomic install;
- :mod:`.writer`  :class:`StoreWriter` (``create``, ``resume``,
  ``create_or_resume``, ``append``, ``finalize``);
- :mod:`.reader`  :class:`TangentStore` (``open``, ``read``,
  ``read_rows``, ``iter_batches``, ``column_stats``) and :class:`Batch`;
- :mod:`.merge`   :func:`merge` of an extraction's shards.

An extraction writes (``rows`` in a fixed, reproducible order)::

    writer = StoreWriter.create_or_resume(out, n_columns, layout,
                                          provenance, total_rows=len(rows))
    for start in range(writer.n_rows, len(rows), batch):
        writer.append(csr, sample, candidate, target)
    writer.finalize()

and training reads::

    with TangentStore.open(out) as store:
        for csr, sample, candidate, target in store.iter_batches(
                25, shuffle=True, seed=epoch):
            ...
"""
from gradnet_cupy.store.format import (
    COMPRESSIONS, DEFAULT_CHUNK_ELEMENTS, DEFAULT_COMPRESSION, FORMAT,
    FORMAT_VERSION, JOURNAL_SUFFIX, SHARD_KEY, TMP_SUFFIX, file_sha256)
from gradnet_cupy.store.merge import merge
from gradnet_cupy.store.reader import Batch, TangentStore
from gradnet_cupy.store.writer import StoreWriter

__all__ = ['Batch', 'COMPRESSIONS', 'DEFAULT_CHUNK_ELEMENTS',
           'DEFAULT_COMPRESSION', 'FORMAT', 'FORMAT_VERSION',
           'JOURNAL_SUFFIX', 'SHARD_KEY', 'StoreWriter', 'TMP_SUFFIX',
           'TangentStore', 'file_sha256', 'merge']
