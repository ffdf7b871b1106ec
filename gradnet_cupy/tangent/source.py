"""What extraction needs from a model: the tangent source interface
(docs/torch.rst#the-source-interface).

Job: define :class:`TangentSource`, the one thing the extraction stage
(:mod:`gradnet_cupy.extract`) asks of a model: per-sample gradient rows of
a per-sample objective for given candidates, in chunks of whole samples
under a byte budget, with the :class:`ParameterLayout` that says what each
column is. Also the row bookkeeping every source shares, so that all
sources order, label and chunk rows the same way: :class:`TangentBatch`,
``CANDIDATE_MODES``, ``MAX_BYTES``, :func:`plan_rows`,
:func:`samples_per_chunk`, :func:`row_labels`, :func:`int_labels`.

Row order (every source): sample-major; with ``R`` rows per sample (``C``
for ``candidates='all'``, else 1) row ``i * R + r`` of a chunk is its
sample ``i`` with candidate ``r`` (``'all'``) or with its own candidate.

Sources: :class:`~gradnet_cupy.tangent.chainer_source.ChainerSource`
(the Chainer engine, :mod:`gradnet_cupy.tangent.engine`) and
:class:`~gradnet_cupy.tangent.torch_source.TorchSource` (a
``torch.nn.Module`` through ``torch.func``).
"""
import abc
from typing import NamedTuple

import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.errors import GradnetError

MAX_BYTES = 256 * 2 ** 20
"""Default budget for the features of one chunk (256 MiB)."""

CANDIDATE_MODES = ('true', 'random', 'all')


class TangentBatch(NamedTuple):
    """Rows of tangent features and what each row is.

    features: (rows, n_params) float32/float64; sample: (rows,) int64 index
    into ``x``; candidate: (rows,) int32 candidate label (for the logit
    Jacobian: the logit index; -1 for an unsupervised objective); target:
    (rows,) int32 true label or -1. All in the array module of ``x``
    (NumPy or CuPy).
    """
    features: object
    sample: object
    candidate: object
    target: object


class TangentSource(abc.ABC):
    """A model as a source of tangent-feature rows.

    Attributes every source has: :attr:`framework` ('chainer', 'torch'),
    :attr:`layout` (the :class:`~gradnet_cupy.tangent.ParameterLayout` of
    the columns: one block per layer, its ``block_sizes`` the per-layer
    segments of the sparsifier, the metric and GradNet) and
    :attr:`objective` (the per-sample
    :class:`~gradnet_cupy.tangent.Objective`, whose ``uses_candidates`` says
    whether rows have candidates).
    """

    framework = None
    layout = None
    objective = None

    @abc.abstractmethod
    def iter_rows(self, x, labels=None, candidates='random', *, seed=0,
                  max_bytes=MAX_BYTES, reuse_buffer=False):
        """Tangent-feature rows of ``x`` in chunks of whole samples.

        x: (N, ...) float NumPy or CuPy array of the model's dtype (the
        device's array module). labels: int (N,) or None (kept as
        ``target``). candidates: one of :data:`CANDIDATE_MODES` or an int
        array (N,) (see :func:`plan_rows`; ignored by an unsupervised
        objective). seed: int or ``np.random.Generator`` of ``'random'``.
        max_bytes: working-set budget of a chunk (None: one chunk).
        reuse_buffer: a chunk's features may be overwritten by the next.

        Inputs are checked when called (GradnetError), before any chunk.
        Yields :class:`TangentBatch` chunks in the array module of ``x``,
        rows sample-major (module docstring), features (rows, n_params) of
        the layout's dtype.
        """

    def rows(self, x, labels=None, candidates='random', *, seed=0,
             max_bytes=MAX_BYTES):
        """Every row of ``x`` as one :class:`TangentBatch` (arguments as
        :meth:`iter_rows`)."""
        chunks = list(self.iter_rows(x, labels, candidates, seed=seed,
                                     max_bytes=max_bytes))
        xp = get_array_module(chunks[0].features)
        return TangentBatch(*[xp.concatenate(part) for part in zip(*chunks)])


def int_labels(values, n, what):
    """``values`` (NumPy/CuPy/list) as a host int64 array of shape (n,);
    GradnetError naming ``what`` otherwise."""
    arr = np.asarray(values.get() if hasattr(values, 'get') else values)
    if arr.ndim != 1 or len(arr) != n:
        raise GradnetError(f'{what} must have shape ({n},) like x; got '
                           f'{arr.shape}')
    if not np.issubdtype(arr.dtype, np.integer):
        raise GradnetError(f'{what} must be integers, not {arr.dtype}')
    return arr.astype(np.int64)


def _check_range(values, n_classes, what):
    if values is not None and len(values) and \
            (values.min() < 0 or values.max() >= n_classes):
        raise GradnetError(
            f'{what} must lie in [0, {n_classes}) for a model with '
            f'{n_classes} classes; got values in [{values.min()}, '
            f'{values.max()}]')


def _candidate_plan(candidates, labels, n_total):
    """(mode, explicit host labels or None) of a supervised objective."""
    if not isinstance(candidates, str):
        return 'explicit', int_labels(candidates, n_total, 'candidates')
    if candidates not in CANDIDATE_MODES:
        raise GradnetError(
            f'unknown candidates mode {candidates!r}: choose one of '
            f'{", ".join(CANDIDATE_MODES)} or pass a label array')
    if candidates == 'true':
        if labels is None:
            raise GradnetError("candidates='true' needs labels")
        return 'explicit', labels
    return candidates, None


def plan_rows(candidates, labels, n_total, n_classes, seed):
    """The rows of a supervised objective over ``n_total`` samples.

    candidates: ``'true'`` (needs labels), ``'random'`` (uniform, drawn
    once for all ``n_total`` samples from ``np.random.default_rng(seed)`` or
    the given Generator), ``'all'`` or an int array (n_total,). labels:
    host int64 (n_total,) or None. n_classes: the model's outputs.
    ``n_classes=None`` means an unsupervised objective: mode ``'none'``.

    Returns ``(mode, explicit, n_passes)``: mode ``'all'``, ``'explicit'``
    or ``'none'``; explicit the host int (n_total,) candidate of every
    sample (None for 'all'/'none'); n_passes the rows per sample.
    GradnetError for an unknown mode or labels/candidates out of range.
    """
    if n_classes is None:
        return 'none', None, 1
    mode, explicit = _candidate_plan(candidates, labels, n_total)
    _check_range(labels, n_classes, 'labels')
    _check_range(explicit, n_classes, 'candidates')
    if mode == 'random':
        rng = seed if isinstance(seed, np.random.Generator) \
            else np.random.default_rng(seed)
        explicit = rng.integers(0, n_classes, size=n_total)
        mode = 'explicit'
    return mode, explicit, n_classes if mode == 'all' else 1


def samples_per_chunk(n_total, max_bytes, sample_bytes):
    """Whole samples per chunk so that ``sample_bytes`` per sample fit
    ``max_bytes`` (at least one; None: all ``n_total``)."""
    if max_bytes is None:
        return n_total
    if max_bytes <= 0:
        raise GradnetError(f'max_bytes must be positive, not {max_bytes}')
    return min(n_total, max(1, int(max_bytes) // int(sample_bytes)))


def row_labels(start, stop, mode, n_passes, explicit, labels):
    """Host ``(sample, candidate, target)`` of the rows of samples
    ``start .. stop`` in the sample-major order: int64, int32, int32
    arrays of ``(stop - start) * n_passes`` rows."""
    n = stop - start
    sample = np.repeat(np.arange(start, stop, dtype=np.int64), n_passes)
    if mode == 'all':
        candidate = np.tile(np.arange(n_passes, dtype=np.int32), n)
    elif mode == 'none':    # unsupervised objective: no candidate
        candidate = np.full(n, -1, np.int32)
    else:
        candidate = explicit[start:stop].astype(np.int32)
    target = np.full(n * n_passes, -1, np.int32) if labels is None \
        else np.repeat(labels[start:stop], n_passes).astype(np.int32)
    return sample, candidate, target
