"""The flat weight vector ``w`` of a layout's parameters, read and written.

Neighbours: :mod:`.targets` projects ``w``, :mod:`.walk` and
:mod:`.baselines` move it. The order of ``w`` is the layout's feature order
(:class:`~gradnet_cupy.tangent.ParameterLayout`: ``w[e.offset:e.offset +
e.size]`` is parameter ``e`` flattened in C order), the same order as the
columns of :func:`~gradnet_cupy.tangent.logit_jacobian`, so a step ``theta``
solved on Jacobian columns is added to ``w`` directly. Which parameters are
in ``w`` is the layout's choice: by default the ``W`` of every Linear and
Convolution2D link; ``layout_of(model, include_bias=True)`` adds their
biases. Parameters outside the layout (biases by default, batch
normalization) are never moved by a walk.
"""
import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.tangent import parameter_layout


def layout_of(model, include_bias=False):
    """The parameter layout a walk moves: weights of Linear/Convolution2D
    links, plus their biases with ``include_bias``."""
    return parameter_layout(model, include_bias=include_bias)


def _param_key(entry):
    return (entry.path.rstrip('/') + '/' + entry.name)


def _params(model, layout):
    params = dict(model.namedparams())
    try:
        return [params[_param_key(e)] for e in layout.entries]
    except KeyError as e:
        raise GradnetError(f'parameter {e.args[0]} of the layout is not in '
                           'the model') from None


def get_weights(model, layout):
    """``w``: a new 1-D array (``layout.n_params``,) of the parameters' dtype
    and array module (NumPy or CuPy)."""
    arrays = [p.array.ravel() for p in _params(model, layout)]
    return get_array_module(arrays[0]).concatenate(arrays)


def get_gradients(model, layout):
    """The parameters' ``grad`` arrays as one vector like :func:`get_weights`
    (zeros where a parameter has no gradient)."""
    params = _params(model, layout)
    xp = get_array_module(params[0].array)
    return xp.concatenate([
        (p.grad if p.grad is not None else xp.zeros_like(p.array)).ravel()
        for p in params])


def set_weights(model, layout, w):
    """Copy ``w`` (``layout.n_params``,) into the model's parameters, in
    place, cast to each parameter's dtype."""
    if w.shape != (layout.n_params,):
        raise GradnetError(f'weight vector of shape {w.shape}, the layout '
                           f'has {layout.n_params} parameters')
    for entry, param in zip(layout.entries, _params(model, layout)):
        part = w[entry.offset:entry.offset + entry.size]
        param.array[...] = part.reshape(entry.shape).astype(param.dtype)


def block_slices(layout):
    """``{link path: slice of w}``, one per link (its W, and b when the
    layout holds it), in layout order."""
    slices, start = {}, 0
    for path, size in zip(layout.block_paths, layout.block_sizes):
        slices[path] = slice(start, start + size)
        start += size
    return slices


def same_architecture(layout_a, layout_b):
    """Raise :class:`GradnetError` unless two layouts select the same
    parameters (paths, names, shapes) in the same order."""
    a = [(e.path, e.name, tuple(e.shape)) for e in layout_a.entries]
    b = [(e.path, e.name, tuple(e.shape)) for e in layout_b.entries]
    if a != b:
        first = next((x, y) for x, y in zip(a + [None] * len(b),
                                            b + [None] * len(a)) if x != y)
        raise GradnetError(f'the two networks differ in architecture: '
                           f'{first[0]} against {first[1]}')


def sparsity(w):
    """Fraction of exactly zero entries of ``w`` (float)."""
    return float((w == 0).sum()) / max(int(w.size), 1)


def host_float64(w):
    """``w`` as a float64 NumPy array (for checkpoints and JSON)."""
    return np.asarray(to_numpy(w), dtype=np.float64)
