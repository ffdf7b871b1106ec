"""Targets of a walk: a set of weight vectors and the projection onto it.

Neighbours: :mod:`.weights` (the vector ``w``), :mod:`.walk` (asks a target
for the unit direction ``v_w`` and the distance each step; 003, eq. 7).

Every target is a closed set ``T`` of weight vectors with a Euclidean
projection ``P``: ``distance(w) = ||w - P(w)||`` and
``direction(w) = (P(w) - w) / distance(w)``. For the sparse targets ``P``
is recomputed at every ``w`` (the set is a union of subspaces: which weights
are zeroed may change along the walk); it is the exact projection onto
that union.

:class:`MagnitudeTarget`
    the p%-sparse set: ``P`` zeroes the ``round(p * size)`` smallest ``|w|``
    of every layer (``scope='layer'``: one count per link of the layout) or
    of the whole vector (``scope='global'``).
:class:`StructuredTarget`
    whole output units of one layer removed: ``P`` zeroes the ``n_units``
    rows (units of a Linear, filters of a Convolution2D) of the layer's
    ``W`` with the smallest L2 norm, together with their biases when the
    layout holds them (without the bias a removed unit still outputs the
    constant ``activation(b)``; use ``include_bias=True`` to remove it
    entirely).
:class:`WeightsTarget`
    one point, another network's weights (the task switch of 003): ``P(w) =
    w2``.

All arrays are 1-D of the layout's length, NumPy or CuPy, float32 or
float64; ``direction`` is float64.
"""
import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.geodesic.weights import block_slices, host_float64

SCOPES = ('layer', 'global')


class Target:
    """A target set; subclasses define :meth:`zero_mask` or :meth:`project`."""

    def zero_mask(self, w):
        """Boolean array: the entries ``P(w)`` sets to zero."""
        raise NotImplementedError

    def project(self, w):
        """``P(w)``, a new array like ``w``."""
        return w * ~self.zero_mask(w)

    def gap(self, w):
        """``(P(w) - w, ||P(w) - w||)``: float64 array and float; raises
        :class:`GradnetError` when the norm is not finite."""
        d = (self.project(w) - w).astype(np.float64)
        norm = float(d @ d) ** 0.5
        if not np.isfinite(norm):
            raise GradnetError('the weights (or the target) are not finite: '
                               'no direction toward the target')
        return d, norm

    def distance(self, w):
        """``||w - P(w)||`` (float)."""
        return self.gap(w)[1]

    def direction(self, w):
        """``(v, distance)``: the unit float64 vector from ``w`` toward
        ``P(w)`` and the distance. Raises :class:`GradnetError` when ``w``
        is already in the set (no direction)."""
        d, norm = self.gap(w)
        if norm == 0:
            raise GradnetError(f'the network already lies in the target set '
                               f'({self.describe()}): nothing to walk')
        return d / norm, norm

    def scaled(self, fraction):
        """The same kind of target with ``fraction`` (0, 1] of its
        removal (the schedule of iterative pruning)."""
        raise GradnetError(f'{type(self).__name__} has no partial version')

    def describe(self):
        """A JSON-able description (checkpoint identity, history)."""
        raise NotImplementedError


def check_sparsity(value):
    """``value`` as a float in (0, 1), else :class:`GradnetError`."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GradnetError(f'sparsity must be a number in (0, 1), got '
                           f'{value!r}') from None
    if not 0 < value < 1:
        raise GradnetError(f'sparsity must be in (0, 1) (a fraction of the '
                           f'weights set to zero), got {value}')
    return value


def _smallest(xp, values, k):
    """Boolean mask of the ``k`` smallest entries of 1-D ``values``."""
    mask = xp.zeros(values.shape, dtype=bool)
    if 0 < k < values.size:
        mask[xp.argpartition(values, k - 1)[:k]] = True
    elif k >= values.size:
        mask[...] = True
    return mask


class MagnitudeTarget(Target):
    """The ``sparsity``-sparse set, counted per layer or globally (module
    docstring). ``layout``: the walk's parameter layout."""

    def __init__(self, layout, sparsity, scope='layer'):
        if scope not in SCOPES:
            raise GradnetError(f"unknown sparsity scope {scope!r}: choose "
                               f"one of {', '.join(SCOPES)}")
        self.layout, self.sparsity, self.scope = (layout,
                                                  check_sparsity(sparsity),
                                                  scope)

    def zero_mask(self, w):
        xp = get_array_module(w)
        magnitude = xp.abs(w)
        if self.scope == 'global':
            return _smallest(xp, magnitude, int(round(self.sparsity * w.size)))
        mask = xp.zeros(w.shape, dtype=bool)
        for part in block_slices(self.layout).values():
            size = part.stop - part.start
            mask[part] = _smallest(xp, magnitude[part],
                                   int(round(self.sparsity * size)))
        return mask

    def scaled(self, fraction):
        return MagnitudeTarget(self.layout, self.sparsity * fraction,
                               self.scope)

    def describe(self):
        return {'kind': 'magnitude', 'sparsity': self.sparsity,
                'scope': self.scope}


class StructuredTarget(Target):
    """``n_units`` output units of link ``layer`` (e.g. ``'conv1'``) set to
    zero, the ones of smallest weight norm (module docstring)."""

    def __init__(self, layout, layer, n_units):
        path = '/' + layer.strip('/')
        entries = {e.name: e for e in layout.entries if e.path == path}
        if 'W' not in entries:
            raise GradnetError(
                f'layer {layer!r} has no weights in the layout; its layers '
                f"are {', '.join(p.strip('/') for p in layout.block_paths)}")
        n_out = entries['W'].shape[0]
        if not (isinstance(n_units, (int, np.integer))
                and 0 < n_units < n_out):
            raise GradnetError(f'layer {layer!r} has {n_out} units; the '
                               f'number to remove must be in [1, {n_out - 1}],'
                               f' got {n_units}')
        self.layout, self.layer, self.n_units = layout, path, int(n_units)
        self.weight, self.bias = entries['W'], entries.get('b')

    def unit_rows(self, w):
        """(n_out, fan_in) view of the layer's ``W`` inside ``w``."""
        e = self.weight
        return w[e.offset:e.offset + e.size].reshape(e.shape[0], -1)

    def zero_mask(self, w):
        xp = get_array_module(w)
        rows = self.unit_rows(w).astype(np.float64)
        removed = _smallest(xp, (rows * rows).sum(axis=1), self.n_units)
        mask = xp.zeros(w.shape, dtype=bool)
        self.unit_rows(mask)[removed] = True
        if self.bias is not None:
            b = self.bias
            mask[b.offset:b.offset + b.size][removed] = True
        return mask

    def scaled(self, fraction):
        return StructuredTarget(self.layout, self.layer,
                                max(1, int(round(self.n_units * fraction))))

    def describe(self):
        return {'kind': 'structured', 'layer': self.layer.strip('/'),
                'n_units': self.n_units}


class WeightsTarget(Target):
    """The single point ``w2`` (another network's weights, same layout)."""

    def __init__(self, w2):
        self.w2 = w2

    def project(self, w):
        if w.shape != self.w2.shape:
            raise GradnetError(f'weight vectors of different lengths: '
                               f'{w.shape[0]} and {self.w2.shape[0]}')
        return self.w2.astype(w.dtype, copy=True)

    def describe(self):
        w2 = host_float64(self.w2)
        return {'kind': 'weights', 'n_params': int(w2.size),
                'norm': float(np.linalg.norm(w2))}
