"""The block-diagonal metric of the tangent space: ``G^{-1/2}`` whitening
of tangent features (docs/method.rst#the-block-metric).

Modules, one job each:

- :mod:`.partition`     blocks of a parameter layout (:func:`layout_blocks`,
  :func:`feature_blocks`), the defaults ``DEFAULT_PARTITION = 'per_unit'``
  and ``DEFAULT_MAX_BLOCK = 256``, the memory budget (:func:`check_memory`);
- :mod:`.block_metric`  :class:`BlockMetric`: accumulate, finalize, apply
  (whitening), and :func:`feature_metric`;
- :mod:`.file`          the metric's HDF5 file (save, load, read_header);
- :mod:`.stored`        the metric saved beside a tangent store;
- :mod:`.size`          the metric's bytes (full, block-diagonal, diagonal;
  :func:`metric_size`), the one count :func:`check_memory` uses.

The ``metric`` normalization built on it (re-sparsified whitening as a
GradNet input normalizer) lives in :mod:`gradnet_cupy.normalize`.
"""
from gradnet_cupy.metric.block_metric import BlockMetric, feature_metric
from gradnet_cupy.metric.file import FILE_FORMAT, FILE_VERSION
from gradnet_cupy.metric.partition import (
    DEFAULT_MAX_BLOCK, DEFAULT_MAX_BYTES, DEFAULT_PARTITION, PARTITIONS,
    check_memory, feature_blocks, layout_blocks)
from gradnet_cupy.metric.size import (
    BYTES_PER_ENTRY, metric_bytes, metric_size, packed_size_with_cap)
from gradnet_cupy.metric.stored import (
    load_store_metric, save_store_metric, store_identity, store_metric_path)

__all__ = ['BYTES_PER_ENTRY', 'BlockMetric', 'DEFAULT_MAX_BLOCK',
           'DEFAULT_MAX_BYTES', 'DEFAULT_PARTITION', 'FILE_FORMAT',
           'FILE_VERSION', 'PARTITIONS', 'check_memory', 'feature_blocks',
           'feature_metric', 'layout_blocks', 'load_store_metric',
           'metric_bytes', 'metric_size',
           'packed_size_with_cap', 'save_store_metric', 'store_identity',
           'store_metric_path']
