"""``extract --mpi``: every rank extracts one shard, rank 0 merges them.

Rank ``r`` of ``N`` writes shard ``r/N`` of the split (the samples of
:func:`gradnet_cupy.extract.shard_range`, the rows an unsharded run computes
for them, bit for bit) to its own store ``OUT.rank<r>-of-<N>``; once every
rank has finished, rank 0 joins the shards into ``OUT`` with
:func:`gradnet_cupy.store.merge` (datasets byte-identical to a
single-process extraction) and removes them. A rank killed mid-run (MPI then
ends the others) leaves its shard's journal: the same command resumes every
shard where it stopped. The shard files and ``OUT`` must be on a file system
that rank 0 can read (on several nodes: a shared one).

Neighbours: :mod:`.parallel` (the ranks), :mod:`gradnet_cupy.extract` (one
shard), :mod:`gradnet_cupy.store` (merge, reader), cli (``extract --mpi``).
"""
from pathlib import Path

from gradnet_cupy.scaleout.parallel import RanksError, gather_errors
from gradnet_cupy.store import TangentStore, merge


def shard_path(out, rank, size):
    """Where rank ``rank`` of ``size`` writes its shard of the store
    ``out``: ``OUT.rank<rank>-of-<size>`` beside it."""
    out = Path(out)
    return out.with_name(f'{out.name}.rank{rank}-of-{size}')


def extract_ranks(parallel, out, extract):
    """Extract the store ``out`` with the ranks of ``parallel``; returns
    the summary dict of the merged store (on every rank).

    ``extract(path, shard) -> summary`` extracts shard ``(i, n)`` into the
    store ``path`` and returns its summary
    (:func:`gradnet_cupy.extract.extract_to_store` with every other argument
    bound). A finished ``out`` is refused (remove it to extract again).
    """
    out = Path(out)
    if out.exists():
        raise RanksError(f'{out} already exists (a finished extraction): '
                           'remove it to extract again')
    rank, size = parallel.rank, parallel.size
    shard = gather_errors(parallel, lambda: extract(
        shard_path(out, rank, size), (rank, size)))
    resumed = sum(parallel.allgather(shard['resumed_from_rows']))

    def merged():
        if not parallel.is_root:
            return None
        paths = [shard_path(out, r, size) for r in range(size)]
        merge(paths, out)
        for path in paths:
            path.unlink()
        with TangentStore.open(out) as store:
            return {'path': str(out), 'rows': len(store), 'nnz': store.nnz,
                    'n_columns': store.n_columns,
                    'resumed_from_rows': resumed,
                    'density': store.nnz / max(1, len(store)
                                               * store.n_columns),
                    'ranks': size}
    return parallel.bcast(gather_errors(parallel, merged))
