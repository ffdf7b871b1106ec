"""The metric saved beside a tangent store (its one job): where
``extract --normalize metric`` keeps the accumulated sums of a store's rows,
and reading them back for ``fit`` only when they belong to exactly those
rows and blocks.

Neighbours: :mod:`.block_metric` (the metric), :mod:`.file` (its header is
compared before the packed sums are read), :mod:`.partition`
(:func:`~.partition.feature_blocks`); the store is an open
:class:`~gradnet_cupy.store.TangentStore` (only its ``path``,
``provenance``, length and ``nnz`` are used).
"""
import json
from pathlib import Path

from gradnet_cupy.metric.block_metric import BlockMetric
from gradnet_cupy.metric.partition import (
    DEFAULT_MAX_BLOCK, DEFAULT_MAX_BYTES, DEFAULT_PARTITION, feature_blocks)


def store_metric_path(store_path):
    """Where ``extract --normalize metric`` keeps the accumulated metric of
    the store ``STORE.h5``: ``STORE.metric.h5`` beside it."""
    path = Path(store_path)
    return path.with_name(path.stem + '.metric.h5')


def store_identity(store):
    """What identifies the rows of an open TangentStore (its provenance,
    with the creation time, row and nonzero counts): the ``source`` of a
    metric accumulated from it."""
    return {'store_provenance': store.provenance, 'rows': len(store),
            'nnz': store.nnz}


def save_store_metric(metric, store):
    """Saves ``metric``, accumulated over every row of the open
    TangentStore ``store``, to :func:`store_metric_path`; returns the
    path."""
    metric.source = store_identity(store)
    path = store_metric_path(store.path)
    metric.save(path)
    return path


def load_store_metric(store, layout, partition=DEFAULT_PARTITION,
                      max_block=DEFAULT_MAX_BLOCK, device='cpu',
                      max_bytes=DEFAULT_MAX_BYTES):
    """``(metric, None)``: the accumulated metric saved beside the open
    TangentStore ``store`` by ``extract --normalize metric``, when it was
    accumulated from exactly these rows and has the blocks of
    ``partition``/``max_block``; ``(None, why not)`` when it does not;
    ``(None, None)`` when there is no such file."""
    path = store_metric_path(store.path)
    if not path.exists():
        return None, None
    blocks, source = BlockMetric.read_header(path)
    if source != json.loads(json.dumps(store_identity(store))):
        return None, f'{path} was accumulated from other rows than {store.path}'
    if blocks != feature_blocks(layout, partition, max_block):
        return None, (f'{path} has other blocks than partition={partition} '
                      f'max_block={max_block}')
    return BlockMetric.load(path, device, max_bytes), None
