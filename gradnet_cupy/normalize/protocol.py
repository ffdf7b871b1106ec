"""The normalizer protocol: what every normalization of tangent features is.

One interface, several representations (NNGeometry's ``PMatAbstract`` idea):
:class:`~gradnet_cupy.normalize.columns.ColumnNormalizer` (per-column
statistics) and :class:`~gradnet_cupy.normalize.metric.MetricNormalizer`
(block-diagonal metric whitening) both implement :class:`Normalizer`, and
the registry in :mod:`gradnet_cupy.normalize` picks one by method name. The
fitting pipelines (:mod:`gradnet_cupy.gradnet.pipelines`) hand a normalizer
its :class:`TrainingFeatures`; :mod:`gradnet_cupy.gradnet.persist` saves
and loads it beside a GradNet. Options come as a
:class:`gradnet_cupy.options.NormalizeOptions`.
"""
import abc
import os
from typing import Callable, Iterable, NamedTuple, Optional

import numpy as np

from gradnet_cupy.kernels import CSR
from gradnet_cupy.tangent import ParameterLayout
from gradnet_cupy.files import atomic_write

STATE_FILE = 'normalizer.npz'


class TrainingFeatures(NamedTuple):
    """The training features a normalizer is fitted on.

    ``layout``: their :class:`~gradnet_cupy.tangent.ParameterLayout`
    (n_params columns, per-layer ``block_sizes``); ``q``: their
    sparsification percentile in (0, 100), or None when unknown;
    ``batches``: ``() -> iterable of CSR`` (float32 rows x n_params) on
    ``device``, one pass over every training row per call; ``device``:
    'cpu' or 'gpu'; ``stats``: their column statistics (dict of float64
    arrays, :data:`~gradnet_cupy.normalize.columns.STAT_FIELDS`) when already
    known, else None; ``store``: the open
    :class:`~gradnet_cupy.store.TangentStore` they come from, or None.
    """
    layout: ParameterLayout
    q: Optional[float]
    batches: Callable[[], Iterable[CSR]]
    device: str = 'cpu'
    stats: Optional[dict] = None
    store: object = None


class Normalizer(abc.ABC):
    """A fitted normalization: ``normalizer(csr) -> CSR`` of float32 data,
    in the array module of the input.

    Subclasses set ``methods`` (the registry names they fit) and
    ``method`` (the name of a fitted instance), and implement :meth:`fit`,
    :meth:`__call__`, :meth:`state` and :meth:`load`. :meth:`save` writes
    :data:`STATE_FILE` from :meth:`state`; a subclass with files of its own
    writes them first.
    """
    methods = ()
    method = None

    @classmethod
    @abc.abstractmethod
    def fit(cls, features, options):
        """The normalizer of ``options.method`` fitted on ``features`` (a
        :class:`TrainingFeatures`) with ``options`` (a
        :class:`~gradnet_cupy.options.NormalizeOptions`)."""

    @abc.abstractmethod
    def __call__(self, csr):
        """The normalized batch: a CSR (NumPy or CuPy) -> CSR, float32."""

    @abc.abstractmethod
    def state(self):
        """A flat dict of NumPy arrays, ``'method'`` included: what
        :data:`STATE_FILE` holds."""

    @classmethod
    @abc.abstractmethod
    def load(cls, folder, state, device='cpu'):
        """The normalizer saved in ``folder`` whose :data:`STATE_FILE` held
        ``state``; arrays of its own on ``device``."""

    def save(self, folder):
        """Writes :data:`STATE_FILE` (:meth:`state`) into ``folder``,
        atomically."""
        atomic_write(os.path.join(folder, STATE_FILE),
                     lambda f: np.savez(f, **self.state()))

    @classmethod
    def extra_settings(cls, options):
        """The JSON-able options, beyond ``method`` and ``power``, that a
        fit with ``options`` depends on (recorded in ``gradnet.json``
        'settings'); none by default."""
        return {}

    @classmethod
    def extraction_accumulator(cls, layout, options, device):
        """What ``extract --normalize METHOD`` accumulates over the rows it
        writes so that a later :meth:`fit` on the store can skip its own
        pass (an object with ``accumulate(csr)``, saved by the extraction),
        or None: nothing beyond the column statistics every store keeps."""
        return None


def read_state(folder):
    """The dict of NumPy arrays in ``folder``'s :data:`STATE_FILE`."""
    with np.load(os.path.join(folder, STATE_FILE)) as npz:
        return dict(npz)
