"""Per-layer rules: a link's recorded call and output gradients -> per-sample
parameter gradients (docs/method.rst#tangent-features).

Job: the math of each supported link type, one documented :class:`Rule`
subclass per type, and the table that maps a link class to its rule
(:func:`rule_for`; users add their own link classes with
:func:`register_rule`). A rule knows nothing of candidates, chunks, threads
or the fallback loop.

Neighbours: :mod:`gradnet_cupy.tangent.engine` records the calls, runs the
backward passes and calls the rules; :mod:`gradnet_cupy.tangent.layout`
asks a rule which parameters it computes (:attr:`Rule.params`, the block
order of a link's parameters in a feature row).

Index conventions in the docstrings below:

* ``n``: samples of the chunk (axis 0 of every recorded input and output);
* ``R``: backward passes run at once (1 for one candidate per row, C for
  ``candidates='all'`` and for the logit Jacobian);
* ``G``: groups of a grouped convolution; ``L``: output positions;
* ``i``, ``r``: a sample and a pass; ``⊗``: outer product.

Every rule writes, for each sample ``i`` and pass ``r``, the gradient of
``<gy[i, r], y_i>`` with respect to the parameter, where ``y_i`` is the
link's output for sample ``i`` alone: samples do not interact in inference
mode, so this is sample ``i``'s own parameter gradient.
"""
from typing import NamedTuple

import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer, L
from gradnet_cupy.errors import GradnetError


class Call(NamedTuple):
    """One recorded forward call of a selected link.

    x: its first positional argument as an array (n, ...) (the link's
    input; a Variable is unwrapped), in the model's array module.
    args, kwargs: the other positional and keyword arguments, as passed.
    out: the output ``chainer.Variable`` (n, ...), part of the recorded
    graph (the engine takes gradients with respect to it).
    """
    x: object
    args: tuple
    kwargs: dict
    out: object


def _write(dest, compute, accumulate):
    """``compute(out)`` returns the value, written into ``out`` when given;
    store it in ``dest`` or, for a second call of the same link, add it."""
    if accumulate:
        dest += compute(None)
    else:
        compute(dest)


def _sum_to(dest, value, axes, accumulate):
    _write(dest, lambda out: value.sum(axis=axes, out=out), accumulate)


def _im2col(img, ksize, stride, pad, dilate, out_hw):
    """(m, c, h, w) -> (m, c*kh*kw, oh*ow) columns (chainer.utils.conv)."""
    conv = chainer.utils.conv
    kh, kw = ksize
    m, c = img.shape[:2]
    args = (img, kh, kw, stride[0], stride[1], pad[0], pad[1])
    options = dict(dy=dilate[0], dx=dilate[1], out_h=out_hw[0],
                   out_w=out_hw[1])
    if get_array_module(img) is np:
        col = conv.im2col_cpu(*args, **options)
    else:
        col = conv.im2col_gpu(*args, **options)
    return col.reshape(m, c * kh * kw, out_hw[0] * out_hw[1])


def _grouped_wgrad(a, col, groups, dest, accumulate):
    """Per-sample, per-pass, per-group ``a @ col^T``: the weight gradient of
    a grouped convolution.

    a: (n, Ra, G*A, L), col: (n, Rc, G*B, L), with Ra, Rc each 1 or the
    number of passes R (broadcast) -> dest (n, R, G*A, B), seen as
    (n, R, G, A, B).
    """
    n, ra, ga, length = a.shape
    rc, gb = col.shape[1:3]
    a = a.reshape(n, ra, groups, ga // groups, length)
    colT = col.reshape(n, rc, groups, gb // groups, length).swapaxes(3, 4)
    d = dest.reshape(dest.shape[:2] + (groups, ga // groups, gb // groups))
    xp = get_array_module(a)
    _write(d, lambda out: xp.matmul(a, colT, out=out), accumulate)


class Rule:
    """Per-sample parameter gradients of one link type, for R backward
    passes at once. Subclass it and implement :meth:`write`; register an
    instance with :func:`register_rule`.

    The engine calls, for every recorded call of a selected link in a
    chunk of ``n`` samples: :meth:`unsupported` (may the call be batched?),
    then :meth:`prepare` once and :meth:`write` once with the output
    gradients of all R passes stacked. :meth:`work` is called on a
    one-sample forward to size the chunks. A rule instance is shared by
    every model and, on the CPU, by the threads computing sub-batches of a
    chunk at the same time: keep no state on it.

    Arrays are in the model's array module (NumPy or CuPy). ``gy`` has the
    logits' float dtype; ``dests`` have the layout's dtype (the selected
    parameters', float32 or float64).

    Besides a rule's own :meth:`unsupported` reasons, the engine computes a
    link by the per-sample fallback loop (or raises with ``strict=True``)
    when one of its selected parameters is used in the graph outside the
    link's own calls.
    """

    params = ('W', 'b')
    """Names of the parameters the rule computes, in block order (the order
    of the link's columns in a feature row). The layout selects those the
    link has, ``'b'`` only with ``include_bias``."""

    def unsupported(self, link, call, n):
        """Why ``call`` (a :class:`Call`) of ``link`` cannot be batched for
        a chunk of ``n`` samples (a phrase completing "link '/path'
        (Type) ...", e.g. ``'uses the channel-last layout'``), or None when
        it can. The base class requires the sample axis first in the input
        and the output; overriding rules should call it too."""
        if call.x.ndim < 1 or call.x.shape[0] != n or \
                call.out.shape[0] != n:
            return ('is called on arrays whose first axis is not the sample '
                    'axis')
        return None

    def prepare(self, link, call):
        """What depends only on the forward pass (e.g. im2col columns),
        computed once per call and shared by its R passes: any object,
        passed to :meth:`write` as ``cache``. Default: None."""
        return None

    def work(self, link, call):
        """Elements per sample of the arrays :meth:`prepare` and
        :meth:`write` allocate beyond ``gy`` and the feature rows (int, in
        units of the feature dtype; the chunk-size estimate). Default: 0."""
        return 0

    def write(self, link, call, cache, gy, dests, accumulate):
        """Per-sample gradients of the R passes into ``dests``.

        gy: (n, R) + call.out.shape[1:], the output gradient of each
        sample under each pass. dests: {name: view (n, R) + param.shape}
        for the names of :attr:`params` that the layout selected (a
        subset; write only those present). accumulate: False for the first
        call of the link in the chunk (overwrite ``dests``), True for a
        later call of the same link (add to ``dests``: the gradients of a
        link called twice are the sums over its calls). Returns None.
        """
        raise NotImplementedError(
            f'{type(self).__name__} does not implement write')


class LinearRule(Rule):
    """``L.Linear``: ``y = x W^T + b``.

    W: (out, in), b: (out,); x: (n, M, in) after flattening (``M = 1`` for
    ``n_batch_axes=1``, where x (n, ...) is flattened to (n, in); else the
    positions of the extra batch axes); gy: (n, R, M, out).

    * ``dW[i, r] = sum_m gy[i, r, m] ⊗ x[i, m]`` -> (n, R, out, in): an
      outer product when ``M = 1``, else the batched matmul
      ``gy[i, r]^T @ x[i]``;
    * ``db[i, r] = sum_m gy[i, r, m]`` -> (n, R, out).
    """

    def write(self, link, call, cache, gy, dests, accumulate):
        n, n_passes = gy.shape[:2]
        out_size, in_size = link.W.shape
        x = call.x.reshape(n, 1, -1, in_size)          # (n, 1, M, in)
        gy = gy.reshape(n, n_passes, -1, out_size)    # (n, R, M, out)
        xp = get_array_module(gy)
        if x.shape[2] == 1:
            compute = lambda out: xp.multiply(  # noqa: E731
                gy[:, :, 0, :, None], x[:, :, 0, None, :], out=out)
        else:
            compute = lambda out: xp.matmul(  # noqa: E731
                gy.swapaxes(2, 3), x, out=out)
        _write(dests['W'], compute, accumulate)
        if 'b' in dests:
            _sum_to(dests['b'], gy, 2, accumulate)


class Convolution2DRule(Rule):
    """``L.Convolution2D`` (any stride, pad, dilation, groups G):
    ``y = conv(x, W) + b``.

    W: (out, in/G, kh, kw), b: (out,); x: (n, in, h, w); gy: (n, R, out,
    oh, ow), ``L = oh*ow``. :meth:`prepare` forms the im2col columns of the
    input once, ``col = im2col(x)``: (n, 1, in*kh*kw, L) (the rows of group
    g are ``g*in/G*kh*kw`` onwards), shared by the R passes.

    * ``dW[i, r, g] = gy[i, r, g] @ col[i, g]^T``: (out/G, L) @ (L,
      in/G*kh*kw) per group, i.e. (n, R, out, in/G, kh, kw);
    * ``db[i, r] = sum over (oh, ow) of gy[i, r]`` -> (n, R, out).

    Not batched: the channel-last (``cudnn_fast``) layout.
    """

    def unsupported(self, link, call, n):
        if getattr(link, 'cudnn_fast', False):
            return 'uses the channel-last (cudnn_fast) layout'
        return super().unsupported(link, call, n)

    def prepare(self, link, call):
        _, _, kh, kw = link.W.shape
        col = _im2col(call.x, (kh, kw), link.stride, link.pad, link.dilate,
                      call.out.shape[2:])
        return col[:, None]

    def work(self, link, call):
        _, _, kh, kw = link.W.shape
        return call.x.shape[1] * kh * kw * int(np.prod(call.out.shape[2:]))

    def write(self, link, call, cache, gy, dests, accumulate):
        n, n_passes, c_out = gy.shape[:3]
        _grouped_wgrad(gy.reshape(n, n_passes, c_out, -1), cache,
                       link.groups, dests['W'], accumulate)
        if 'b' in dests:
            _sum_to(dests['b'], gy, (3, 4), accumulate)


class Deconvolution2DRule(Rule):
    """``L.Deconvolution2D`` (the transposed convolution; any stride, pad,
    dilation, groups G): ``y = deconv(x, W) + b``.

    W: (in, out/G, kh, kw), b: (out,); x: (n, in, h, w); gy: (n, R, out,
    oh, ow). The roles of input and output swap against
    :class:`Convolution2DRule`: the im2col columns are those of the output
    gradient, ``col = im2col(gy)`` with the link's stride, pad and dilation
    on the input's grid: (n, R, out*kh*kw, h*w).

    * ``dW[i, r, g] = x[i, g] @ col[i, r, g]^T``: (in/G, h*w) @ (h*w,
      out/G*kh*kw) per group, i.e. (n, R, in, out/G, kh, kw);
    * ``db[i, r] = sum over (oh, ow) of gy[i, r]`` -> (n, R, out).
    """

    def work(self, link, call):
        _, _, kh, kw = link.W.shape
        return call.out.shape[1] * kh * kw * int(np.prod(call.x.shape[2:]))

    def write(self, link, call, cache, gy, dests, accumulate):
        _, _, kh, kw = link.W.shape
        x = call.x
        n, n_passes = gy.shape[:2]
        col = _im2col(gy.reshape((n * n_passes,) + gy.shape[2:]), (kh, kw),
                      link.stride, link.pad, link.dilate, x.shape[2:])
        _grouped_wgrad(x.reshape(n, 1, x.shape[1], -1),
                       col.reshape((n, n_passes) + col.shape[1:]),
                       link.groups, dests['W'], accumulate)
        if 'b' in dests:
            _sum_to(dests['b'], gy, (3, 4), accumulate)


class BatchNormalizationRule(Rule):
    """``L.BatchNormalization`` in inference mode (running statistics):
    ``y = gamma * x_hat + beta``, ``x_hat = (x - avg_mean) /
    sqrt(avg_var + eps)``.

    gamma, beta, avg_mean, avg_var: shape S (e.g. (c,)); x: (n,) + S + (...)
    normalized over axis 0 and the trailing axes (or over ``link.axis``);
    gy: (n, R) + x.shape[1:]. :meth:`prepare` forms ``x_hat`` (n, 1, ...)
    once. With the sums over the normalized axes other than the sample
    axis:

    * ``dgamma[i, r] = sum gy[i, r] * x_hat[i]`` -> (n, R) + S;
    * ``dbeta[i, r] = sum gy[i, r]`` -> (n, R) + S.

    Not batched: a link whose axes do not include the sample axis 0.
    """

    params = ('gamma', 'beta')

    def _axes(self, link, x):
        """Normalized axes of ``x`` (as Chainer computes them)."""
        if link.axis is not None:
            return tuple(link.axis)
        return (0,) + tuple(range(link.avg_mean.ndim + 1, x.ndim))

    def unsupported(self, link, call, n):
        if 0 not in self._axes(link, call.x):
            return 'does not normalize over the sample axis 0'
        return super().unsupported(link, call, n)

    def prepare(self, link, call):
        """x_hat (n, 1, ...) and the per-sample axes of gy (n, R, ...)."""
        x = call.x
        axes = self._axes(link, x)
        shape = [1 if i in axes else s for i, s in enumerate(x.shape)]
        xp = get_array_module(x)
        mean = link.avg_mean.reshape(shape)
        inv_std = 1 / xp.sqrt(link.avg_var.reshape(shape) + link.eps)
        x_hat = ((x - mean) * inv_std)[:, None]
        return x_hat, tuple(a + 1 for a in axes[1:])

    def work(self, link, call):
        return call.x[0].size

    def write(self, link, call, cache, gy, dests, accumulate):
        x_hat, axes = cache
        if 'gamma' in dests:
            _sum_to(dests['gamma'], gy * x_hat, axes, accumulate)
        if 'beta' in dests:
            _sum_to(dests['beta'], gy, axes, accumulate)


class EmbedIDRule(Rule):
    """``L.EmbedID``: ``y[p] = W[x[p]]`` for every id position ``p``.

    W: (V, d); x: integer ids (n, P...) (P... any further axes, ``P``
    positions in all); gy: (n, R, P..., d).

    * ``dW[i, r, v] = sum over positions p with x[i, p] == v of
      gy[i, r, p]`` -> (n, R, V, d): a scatter-add of the output gradients
      into the rows of the looked-up ids; positions holding
      ``link.ignore_label`` contribute nothing.
    """

    params = ('W',)

    def write(self, link, call, cache, gy, dests, accumulate):
        n, n_passes = gy.shape[:2]
        xp = get_array_module(gy)
        ids = xp.broadcast_to(call.x.reshape(n, 1, -1),
                              (n, n_passes, call.x[0].size))
        gy = gy.reshape(ids.shape + (-1,))
        sample, rep = xp.meshgrid(xp.arange(n), xp.arange(n_passes),
                                  indexing='ij')
        shape = ids.shape
        sample = xp.broadcast_to(sample[:, :, None], shape)
        rep = xp.broadcast_to(rep[:, :, None], shape)
        keep = ids != link.ignore_label if link.ignore_label is not None \
            else xp.ones(shape, dtype=bool)
        dest = dests['W']
        if not accumulate:
            dest[...] = 0
        index = (sample[keep], rep[keep], ids[keep])
        if xp is np:
            np.add.at(dest, index, gy[keep])
        else:
            import cupyx
            cupyx.scatter_add(dest, index, gy[keep])


_RULES = {
    L.Linear: LinearRule(),
    L.Convolution2D: Convolution2DRule(),
    L.Deconvolution2D: Deconvolution2DRule(),
    L.BatchNormalization: BatchNormalizationRule(),
    L.EmbedID: EmbedIDRule(),
}


def register_rule(link_class, rule):
    """Batch the per-sample gradients of ``link_class`` links with ``rule``.

    link_class: a ``chainer.Link`` subclass; rule: a :class:`Rule`
    instance (it replaces any rule registered for that class before).
    Only links of exactly that class use the rule (see :func:`rule_for`).
    ``parameter_layout`` selects such links when they are named in its
    ``links`` argument, taking the parameters in ``rule.params`` order.
    Raises GradnetError when ``link_class`` is not a Link subclass or
    ``rule`` not a Rule instance.
    """
    if not isinstance(link_class, type) or \
            not issubclass(link_class, chainer.Link):
        raise GradnetError(
            'register_rule needs a chainer.Link subclass, not '
            f'{_describe(link_class)}')
    if not isinstance(rule, Rule):
        raise GradnetError(
            f'register_rule needs a Rule instance for {link_class.__name__}'
            f', not {_describe(rule)}')
    _RULES[link_class] = rule


def _describe(value):
    """A one-line name of ``value`` for error messages."""
    if isinstance(value, type):
        return f'the class {value.__name__}'
    return f'a {type(value).__name__}'


def rule_for(link):
    """The rule registered for the class of ``link``, or None (the link is
    computed by the per-sample fallback).

    The lookup is by the exact class: a subclass of a rule's link type (it
    may override ``forward``) has no rule unless registered itself.
    """
    return _RULES.get(type(link))
