"""Normalizations of tangent features: the registry of the
:class:`~gradnet_cupy.normalize.protocol.Normalizer` protocol's
representations.

Neighbours: :mod:`.protocol` (the interface and :class:`TrainingFeatures`),
:mod:`.columns` (the six column-wise methods, :data:`COLUMN_METHODS`),
:mod:`.metric` (``metric``, block-diagonal whitening). Callers (the GradNet
pipelines, persistence, the CLI) go through :func:`fit_normalizer`,
:func:`load_normalizer` and :func:`normalizer_class` and never branch on a
method name.
"""
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.normalize.columns import (
    COLUMN_METHODS, STAT_FIELDS, ColumnNormalizer, ColumnStats)
from gradnet_cupy.normalize.metric import MetricNormalizer
from gradnet_cupy.normalize.protocol import (
    STATE_FILE, Normalizer, TrainingFeatures, read_state)

_CLASSES = {method: cls for cls in (ColumnNormalizer, MetricNormalizer)
            for method in cls.methods}
# every method name, in the order the CLI lists them
NORMALIZATIONS = tuple(_CLASSES)


def normalizer_class(method):
    """The :class:`Normalizer` subclass that fits ``method``."""
    try:
        return _CLASSES[method]
    except KeyError:
        raise GradnetError(f"unknown normalization {method!r}: choose one of "
                           f"{', '.join(NORMALIZATIONS)}") from None


def fit_normalizer(features, options):
    """The normalization ``options.method`` (a
    :class:`~gradnet_cupy.options.NormalizeOptions`) fitted on the training
    ``features`` (a :class:`TrainingFeatures`) alone."""
    return normalizer_class(options.method).fit(features, options)


def load_normalizer(folder, device='cpu'):
    """The normalizer that :meth:`Normalizer.save` wrote into ``folder``,
    its own arrays (if any) on ``device``."""
    state = read_state(folder)
    return normalizer_class(str(state['method'])).load(folder, state, device)


__all__ = ['COLUMN_METHODS', 'NORMALIZATIONS', 'STATE_FILE', 'STAT_FIELDS',
           'ColumnNormalizer', 'ColumnStats', 'MetricNormalizer',
           'Normalizer', 'TrainingFeatures', 'fit_normalizer',
           'load_normalizer', 'normalizer_class', 'read_state']
