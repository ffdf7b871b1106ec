"""The ``metric`` normalization: block-diagonal ``G^{-1/2}`` whitening of
tangent features, re-sparsified (docs/method.rst#normalization).

One representation of the :class:`~gradnet_cupy.normalize.protocol.Normalizer`
protocol (its sibling: :mod:`gradnet_cupy.normalize.columns`). The metric
itself (blocks, accumulation, finalize, apply, its HDF5 file and the sums
``extract --normalize metric`` keeps beside a store) is
:mod:`gradnet_cupy.metric`'s; this module decides where a fit's sums come
from and saves the finalized metric beside a GradNet. It is the only place
outside :mod:`gradnet_cupy.metric` that knows the method ``'metric'``.
"""
import os
import warnings

import numpy as np

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.kernels.sparsify import check_q
from gradnet_cupy.metric import BlockMetric, feature_metric, load_store_metric
from gradnet_cupy.normalize.protocol import Normalizer


class MetricNormalizer(Normalizer):
    """The ``metric`` normalization of docs/method.rst#metric-normalization: ``normalizer(csr) ->
    CSR``, each row whitened by a finalized :class:`BlockMetric` and
    re-sparsified per base-network layer block with the percentile rule at
    ``q`` (the extraction's), so that GradNet's input stays sparse.

    ``metric``: a finalized BlockMetric whose ``segment_sizes`` are the
    layer blocks; ``q``: float in (0, 100). Input batches must be on the
    metric's device.
    """
    methods = ('metric',)
    method = 'metric'
    FILE = 'metric.h5'

    def __init__(self, metric, q):
        metric.require_finalized()
        self.metric = metric
        self.q = float(q)

    @classmethod
    def fit(cls, features, options):
        """The metric of the training ``features`` (every row weight 1),
        finalized with the relative ``options.metric.damping``
        (``lambda_b = damping * trace(G_b) / size_b``).

        The sums come from :meth:`stored_sums` when the features' store has
        fitting ones, else from one pass (:meth:`accumulate`) with the
        blocks of ``options.metric`` (partition, max_block: None or 0 is no
        cap, max_bytes).
        """
        check_q(features.q)
        metric = cls.stored_sums(features, options.metric)
        if metric is None:
            metric = cls.accumulate(features, options.metric)
        return cls.from_accumulated(metric, features.q,
                                    options.metric.damping)

    @staticmethod
    def accumulate(features, metric_options):
        """A :class:`BlockMetric` on ``features.device`` holding the sums of
        one pass over ``features.batches()``."""
        return _empty_metric(features.layout, metric_options,
                             features.device).accumulate_batches(
                                 features.batches())

    @staticmethod
    def stored_sums(features, metric_options):
        """The sums ``extract --normalize metric`` saved beside
        ``features.store``
        (:func:`~gradnet_cupy.metric.load_store_metric`), on
        ``features.device``; None when there is no store or no such file,
        or, with a warning saying why, when they do not fit the store or
        the blocks of ``metric_options``."""
        if features.store is None:
            return None
        metric, why_not = load_store_metric(
            features.store, features.layout, metric_options.partition,
            metric_options.max_block, features.device,
            metric_options.max_bytes)
        if why_not:
            warnings.warn(f'{why_not}: accumulating the metric again from '
                          'the store', stacklevel=3)
        return metric

    @classmethod
    def from_accumulated(cls, metric, q, damping=1e-3):
        """The normalizer of a :class:`BlockMetric` that holds the training
        rows' sums, finalized here with relative ``damping``; a diagonal
        metric (every block one column) is first floored per layer by
        :func:`layer_floored`."""
        check_q(q)
        if metric.diagonal:
            metric = layer_floored(metric, damping)
        return cls(metric.finalize(damping, relative=True), q)

    def __call__(self, csr):
        return self.metric.apply(csr, self.q)

    def state(self):
        """The flat dict saved as ``normalizer.npz`` (the blocks go to
        :attr:`FILE` beside it, see :meth:`save`)."""
        return {'method': np.array(self.method), 'q': np.array(self.q)}

    def save(self, folder):
        """Writes the metric to ``folder/metric.h5``, then
        ``normalizer.npz``, each atomically."""
        self.metric.save(os.path.join(folder, self.FILE))
        super().save(folder)

    @classmethod
    def load(cls, folder, state, device='cpu'):
        """The normalizer saved in ``folder`` with ``state`` (its
        normalizer.npz), the metric on ``device``."""
        return cls(BlockMetric.load(os.path.join(folder, cls.FILE), device),
                   float(state['q']))

    @classmethod
    def extra_settings(cls, options):
        """``{'metric': {partition, max_block, damping}}``: what the fitted
        metric depends on (``max_bytes`` only bounds memory)."""
        metric = options.metric
        return {'metric': {'partition': metric.partition,
                           'max_block': metric.max_block,
                           'damping': metric.damping}}

    @classmethod
    def extraction_accumulator(cls, layout, options, device):
        """An empty :func:`~gradnet_cupy.metric.feature_metric` with the
        blocks of ``options.metric``, on ``device``."""
        return _empty_metric(layout, options.metric, device)


def layer_floored(metric, damping):
    """A copy of the diagonal ``metric`` (a :class:`BlockMetric` whose
    blocks are single columns, not finalized) whose mean diagonal carries a
    floor per re-sparsification segment (the base network's layer blocks):
    ``M_jj + damping * mean(M_ii, i in j's segment)`` with ``M = G /
    weight_sum``, the mean over all of the segment's columns (a segment no
    row touched stays zero and so passes through unchanged).

    Why: the relative damping of a one-column block is ``damping * M_jj``,
    which only rescales the column by ``(1 + damping)^{-1/2}``, so a column
    that the fitting rows keep rarely and small gets an unbounded scale
    (fitted on a held-out split, some training rows' entries grew 10^4-fold
    and GradNet diverged: docs/reproductions.rst). With the floor, a layer's
    largest scale is ``(damping * its mean M_jj)^{-1/2}``.
    """
    bounds = np.cumsum(metric.segment_sizes)
    segment = np.searchsorted(bounds, metric.blocks.starts, side='right')
    mean = to_numpy(metric.G) / metric.weight_sum     # (k,): G_b is 1 x 1
    layer_mean = np.bincount(segment, mean, len(bounds)) / \
        metric.segment_sizes
    floored = BlockMetric(metric.blocks, metric.segment_sizes, metric.device)
    floored.G = metric.G + metric.xp.asarray(
        damping * metric.weight_sum * layer_mean[segment])
    floored.weight_sum, floored.source = metric.weight_sum, metric.source
    return floored


def _empty_metric(layout, metric_options, device):
    """An empty :func:`~gradnet_cupy.metric.feature_metric` over ``layout``
    with the blocks and memory bound of ``metric_options``."""
    return feature_metric(layout, metric_options.partition,
                          metric_options.max_block, device,
                          metric_options.max_bytes)

