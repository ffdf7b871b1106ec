"""Per-sample tangent features of a Chainer classifier (DESIGN §1 steps 2, 6).

For a model ``f`` returning logits ``z = f(x)`` of shape (n, C), an input
batch ``x`` and one candidate label ``c`` per row, the tangent feature of a
row is the per-sample gradient of the softmax cross-entropy

    t(x_i, c) = d CE(softmax(z_i), c) / d theta      (one row of n_params)

with respect to the parameters selected by a :class:`ParameterLayout`. The
loss is per sample (never batch-averaged), the model always runs in inference
mode (``chainer.config.train = False``: BatchNormalization uses its running
statistics, Dropout is off), so samples do not interact.

Public API
----------
``parameter_layout(model, *, include_bias=False, include_batchnorm=False,
include_deconvolution=False, include_embed_id=False, links=None)``
    -> :class:`ParameterLayout` (which parameters, in which order: one block
    per link, blocks in the model's definition order; its ``block_sizes``
    are the per-layer ``sizes`` used downstream; JSON-able via
    ``to_dict``/``from_dict``).

``tangent_features(model, x, labels=None, candidates='random', *,
layout=None, seed=0, weight_decay=0.0, strict=False, max_bytes=MAX_BYTES,
n_threads=None)`` -> :class:`TangentBatch` with every row at once.
``weight_decay`` adds ``weight_decay * theta`` to every selected parameter's
gradient (off by default). ``n_threads`` (CPU only): each chunk is split
into that many sub-batches run in parallel threads with single-threaded
BLAS (default: the CPUs this process may use).

``iter_tangent_features(...same..., reuse_buffer=False)``
    -> iterator of :class:`TangentBatch` chunks of whole samples, sized so
    that a chunk's features plus its main working arrays (output gradients
    of every backward pass, recorded inputs, im2col columns) stay within
    ``max_bytes`` (at least one sample per chunk; Chainer's own temporaries
    come on top). Chunks hold the same rows and metadata as one big chunk;
    the values agree to rounding (Chainer's forward pass itself is not
    bit-identical across batch sizes: BLAS blocking).

``logit_jacobian(model, x, *, layout=None, strict=False, max_bytes=MAX_BYTES,
n_threads=None)`` -> array (n, C, n_params): ``[i, k]`` is d z_ik / d theta.
``iter_logit_jacobian(model, x, labels=None, *, layout=None, strict=False,
max_bytes=MAX_BYTES, n_threads=None, reuse_buffer=False)`` -> its chunks as
    TangentBatch (``candidate`` = logit index ``k``).

Candidates (``candidates=``): ``'true'`` (the label, needs ``labels``),
``'random'`` (uniform over the classes, drawn once for the whole ``x`` from
``np.random.default_rng(seed)`` or a given ``np.random.Generator``),
``'all'`` (C rows per sample, sample-major: row ``i*C + c`` is sample ``i``
with candidate ``c``), or an integer array of shape (n,).

Errors (GradnetError) are raised when the function is called, iterators
included: every input is checked and the first sample is run forward once
(to learn the number of classes) before any chunk is computed.

Dtypes: features have the selected parameters' dtype (float32 for a float32
model, float64 for a float64 one) and live in the model's array module
(NumPy or CuPy, the same as ``x``); ``sample`` is int64, ``candidate`` and
``target`` are int32 (``target`` is -1 where no labels were given).

How it works (no per-sample loop for supported links)
-----------------------------------------------------
One forward pass records, through a Chainer ``LinkHook``, the input and the
output variable of every call of a selected link. Backward passes
(``chainer.grad``, which prunes the graph, so no parameter gradient is
computed) then give each link's output gradient ``gy`` for a chosen gradient
``g`` of the logits; because the loss is a sum of per-sample losses and
samples do not interact, ``gy[i]`` is exactly sample ``i``'s output gradient.
Per-layer rules turn ``(input, gy)`` into per-sample parameter gradients:

* ``Linear``: ``gW_i = gy_i (outer) x_i`` (a batched matmul when
  ``n_batch_axes > 1``), ``gb_i = gy_i``;
* ``Convolution2D`` (any stride, pad, dilation, groups): im2col of the input
  (``chainer.utils.conv``), then per sample and group ``gW = gy @ col^T``;
* ``Deconvolution2D``: the same with the roles swapped (im2col of ``gy``);
* ``BatchNormalization`` (inference mode): ``ggamma_i = sum(gy_i * x_hat_i)``,
  ``gbeta_i = sum(gy_i)`` over the non-channel axes;
* ``EmbedID``: scatter-add of ``gy_i`` into the rows of the looked-up ids.

The gradient of CE for candidate ``c`` w.r.t. the logits is
``g = softmax(z) - e_c``, so one forward serves every candidate: modes
``'true'``/``'random'``/explicit need one backward pass (each row its own
``g``), ``'all'`` needs C backward passes, pass ``c`` seeded with
``softmax(z) - e_c``. That is the cheapest exact choice: the C output
gradients per sample are C different vectors, so C passes are needed anyway,
and seeding with ``softmax(z) - e_c`` directly avoids combining Jacobian rows
afterwards. The logit Jacobian uses the same machinery seeded with ``e_k``.
The output gradients of all passes are stacked, (n, passes, ...), and each
rule runs once over them (im2col of a convolution input is done once).

Links without a rule, and rule links used in a way the rules do not cover
(batch axis not first, a parameter also used outside the link's own call, a
channel-last convolution, BatchNormalization not normalizing over axis 0),
are computed by a per-sample autograd loop (one forward per sample, one
``chainer.grad`` per row) with a :class:`TangentFallbackWarning` naming the
link; ``strict=True`` raises :class:`GradnetError` instead. The check counts,
in the recorded graph, the function nodes using each selected parameter and
compares with the recorded link calls, so a weight used elsewhere is noticed.
Only rule links of exactly the rule's type are batched (a subclass may
override ``forward``).

Assumption (not checkable cheaply): in inference mode the model processes
samples independently (true for ordinary feed-forward classifiers).
"""
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Tuple

import numpy as np
from threadpoolctl import ThreadpoolController

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer, L
from gradnet_cupy.errors import GradnetError

MAX_BYTES = 256 * 2 ** 20
"""Default budget for the features of one chunk (256 MiB)."""

CANDIDATE_MODES = ('true', 'random', 'all')


class TangentFallbackWarning(UserWarning):
    """A link's per-sample gradients come from the slow per-sample loop."""


# --------------------------------------------------------------------------
# Parameter layout
# --------------------------------------------------------------------------

class ParameterEntry(NamedTuple):
    """One selected parameter: ``features[:, offset:offset + size]`` is its
    per-sample gradient, flattened in C order from ``shape``."""
    path: str          # link path, e.g. '/conv1' ('/' for the model itself)
    name: str          # parameter name within the link, e.g. 'W'
    shape: Tuple[int, ...]
    offset: int
    size: int
    link_type: str     # class name of the link, e.g. 'Convolution2D'


class ParameterLayout(NamedTuple):
    """The selected parameters in feature order.

    One block per link (its W, then its bias when selected; gamma then beta
    for BatchNormalization), blocks in the model's definition order.
    """
    entries: Tuple[ParameterEntry, ...]

    @property
    def n_params(self):
        """Length of a feature row (int)."""
        return sum(e.size for e in self.entries)

    @property
    def block_paths(self):
        """Link path of each block, in feature order (tuple of str)."""
        paths = []
        for e in self.entries:
            if not paths or paths[-1] != e.path:
                paths.append(e.path)
        return tuple(paths)

    @property
    def block_sizes(self):
        """Length of each block (tuple of int, sums to ``n_params``): the
        ``sizes`` of the per-layer sparsification and GradNet's blocks."""
        sizes = Counter()
        for e in self.entries:
            sizes[e.path] += e.size
        return tuple(sizes[p] for p in self.block_paths)

    def to_dict(self):
        """A JSON-able dict; :meth:`from_dict` inverts it."""
        return {'entries': [
            {'path': e.path, 'name': e.name, 'shape': list(e.shape),
             'offset': e.offset, 'size': e.size, 'link_type': e.link_type}
            for e in self.entries]}

    @classmethod
    def from_dict(cls, d):
        """Rebuild a layout from :meth:`to_dict` output, checking that it is
        consistent (contiguous offsets, sizes matching shapes, one block per
        link)."""
        try:
            entries = tuple(
                ParameterEntry(str(e['path']), str(e['name']),
                               tuple(int(s) for s in e['shape']),
                               int(e['offset']), int(e['size']),
                               str(e['link_type']))
                for e in d['entries'])
        except (KeyError, TypeError, ValueError) as exc:
            raise GradnetError(f'malformed parameter layout: {exc!r}')
        return _checked_layout(entries)


def _checked_layout(entries):
    offset = 0
    for e in entries:
        if e.offset != offset or e.size != int(np.prod(e.shape, dtype=np.int64)):
            raise GradnetError(
                f'parameter layout entry {e.path}/{e.name}: offset {e.offset}'
                f' size {e.size} shape {e.shape} is inconsistent (expected '
                f'offset {offset}, size = product of shape)')
        offset += e.size
    layout = ParameterLayout(entries)
    if len(layout.block_paths) != len(set(e.path for e in entries)):
        raise GradnetError(
            'parameter layout: the entries of one link are not adjacent')
    return layout


def _named_links(model):
    """(path, link) pairs in definition order (Chain: attribute assignment
    order; ChainList: index order), each link once."""
    out, seen = [], set()

    def walk(prefix, link):
        if id(link) in seen:
            return
        seen.add(id(link))
        out.append((prefix or '/', link))
        if isinstance(link, chainer.ChainList):
            children = [(str(i), c) for i, c in enumerate(link)]
        elif isinstance(link, chainer.Chain):
            children = [(k, v) for k, v in link.__dict__.items()
                        if k in link._children]
        else:
            children = []
        for name, child in children:
            walk(f'{prefix}/{name}', child)

    walk('', model)
    return out


def _own_params(link):
    """{name: Parameter} of the link's own (not its children's) parameters."""
    return {name: getattr(link, name) for name in sorted(link._params)}


def _selected_names(link, include_bias):
    """Parameter names of ``link`` that a layout selects, W first."""
    params = _own_params(link)
    rule = _RULES.get(type(link))
    if rule is not None:
        names = [n for n in rule.params if n in params]
        if not include_bias:
            names = [n for n in names if n != 'b']
        return names
    return [n for n in params if include_bias or n != 'b']


def parameter_layout(model, *, include_bias=False, include_batchnorm=False,
                     include_deconvolution=False, include_embed_id=False,
                     links=None):
    """Select the parameters whose per-sample gradients form the features.

    Default (the paper's choice): ``W`` of every ``Linear`` and
    ``Convolution2D`` link. ``include_bias`` adds each selected link's ``b``;
    ``include_batchnorm`` adds BatchNormalization ``gamma``/``beta``;
    ``include_deconvolution`` / ``include_embed_id`` add the ``W`` of
    ``Deconvolution2D`` / ``EmbedID`` links.

    ``links``: an explicit list of link paths (as in ``model.namedlinks()``,
    e.g. ``['/conv2', '/fc']``) replacing the type selection; each named link
    contributes its weights (W; gamma/beta for BatchNormalization; for a link
    type without a batched rule all its own parameters) plus ``b`` when
    ``include_bias``. Such rule-less links are computed by the per-sample
    fallback (see the module docstring).

    Blocks follow the model's definition order. All selected parameters must
    be initialized. Returns a :class:`ParameterLayout`; raises GradnetError
    for an unknown path, a link without parameters of its own, an
    uninitialized parameter, or an empty selection.
    """
    named = _named_links(model)
    if links is None:
        kinds = [L.Linear, L.Convolution2D]
        if include_batchnorm:
            kinds.append(L.BatchNormalization)
        if include_deconvolution:
            kinds.append(L.Deconvolution2D)
        if include_embed_id:
            kinds.append(L.EmbedID)
        chosen = [(p, link) for p, link in named if type(link) in kinds]
    else:
        if isinstance(links, str):
            links = [links]
        by_path = dict(named)
        chosen = []
        for path in links:
            if path not in by_path:
                raise GradnetError(
                    f'link path {path!r} is not in the model; its links are: '
                    + ', '.join(p for p, _ in named))
            if not _own_params(by_path[path]):
                raise GradnetError(
                    f'link {path!r} ({type(by_path[path]).__name__}) has no '
                    'parameters of its own; name the links inside it')
            chosen.append((path, by_path[path]))
        order = {p: i for i, (p, _) in enumerate(named)}
        chosen = sorted(set(chosen), key=lambda pl: order[pl[0]])
    entries, offset = [], 0
    for path, link in chosen:
        params = _own_params(link)
        for name in _selected_names(link, include_bias):
            param = params[name]
            if param.array is None:
                raise GradnetError(
                    f'parameter {path}/{name} is not initialized; run one '
                    'forward pass of the model first')
            shape = tuple(int(s) for s in param.shape)
            size = int(np.prod(shape, dtype=np.int64))
            entries.append(ParameterEntry(path, name, shape, offset, size,
                                          type(link).__name__))
            offset += size
    if not entries:
        raise GradnetError('the parameter selection is empty: the model has '
                           'no Linear/Convolution2D link (or none selected)')
    return ParameterLayout(tuple(entries))


# --------------------------------------------------------------------------
# Per-layer rules: (recorded call, output gradient) -> per-sample gradients
# --------------------------------------------------------------------------

class _Call(NamedTuple):
    """One recorded call of a selected link: its input array, the other
    positional and keyword arguments, and its output variable."""
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


class _Rule:
    """Per-sample gradients of one link type, for R backward passes at once.

    ``params``: the parameter names the rule computes, in block order.
    ``unsupported(link, call, n)``: a reason string when this call cannot be
    batched, else None. ``prepare(link, call)``: what depends only on the
    forward pass. ``work(link, call)``: elements of that per sample.
    ``write(link, call, cache, gy, dests, accumulate)``: from the output
    gradients ``gy`` (n, R) + out.shape[1:] of the R passes, the per-sample
    gradients into ``dests[name]`` of shape (n, R) + param.shape.
    """
    params = ('W', 'b')

    def unsupported(self, link, call, n):
        if call.x.ndim < 1 or call.x.shape[0] != n or \
                call.out.shape[0] != n:
            return ('is called on arrays whose first axis is not the sample '
                    'axis')
        return None

    def prepare(self, link, call):
        return None

    def work(self, link, call):
        return 0


class _LinearRule(_Rule):
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


class _ConvolutionRule(_Rule):
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


class _DeconvolutionRule(_Rule):
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


class _BatchNormalizationRule(_Rule):
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


class _EmbedIDRule(_Rule):
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
    L.Linear: _LinearRule(),
    L.Convolution2D: _ConvolutionRule(),
    L.Deconvolution2D: _DeconvolutionRule(),
    L.BatchNormalization: _BatchNormalizationRule(),
    L.EmbedID: _EmbedIDRule(),
}


# --------------------------------------------------------------------------
# Forward recording and the per-chunk engine
# --------------------------------------------------------------------------

class _Recorder(chainer.LinkHook):
    """Records every forward call of the given links."""
    name = 'gradnet_cupy_tangent_recorder'

    def __init__(self, links):
        self.calls = {id(link): [] for link in links}

    def forward_postprocess(self, args):
        calls = self.calls.get(id(args.link))
        if calls is None or args.forward_name != 'forward' or not args.args:
            return
        x = args.args[0]
        x = x.array if isinstance(x, chainer.Variable) else x
        calls.append(_Call(x, tuple(args.args[1:]), dict(args.kwargs),
                           args.out))


class _Slot(NamedTuple):
    """One link of the layout: its entries and their Parameters."""
    path: str
    link: object
    entries: tuple
    params: tuple


def _slots(model, layout):
    """Resolve ``layout`` on ``model`` into per-link slots, checking shapes."""
    by_path = dict(_named_links(model))
    slots = []
    for path in layout.block_paths:
        link = by_path.get(path)
        if link is None:
            raise GradnetError(f'layout link {path!r} is not in the model')
        entries = tuple(e for e in layout.entries if e.path == path)
        own = _own_params(link)
        params = []
        for e in entries:
            p = own.get(e.name)
            if p is None or p.array is None or tuple(p.shape) != e.shape:
                have = None if p is None or p.array is None else tuple(p.shape)
                raise GradnetError(
                    f'layout parameter {path}/{e.name} with shape {e.shape} '
                    f'does not match the model (model has {have})')
            params.append(p)
        slots.append(_Slot(path, link, entries, tuple(params)))
    return slots


def _param_uses(z, params):
    """How many function nodes of z's graph take each parameter as input:
    {id(param): count}."""
    wanted = {id(p.node): id(p) for p in params}
    counts = Counter()
    seen = set()
    stack = [z.creator_node] if z.creator_node is not None else []
    while stack:
        func = stack.pop()
        if id(func) in seen:
            continue
        seen.add(id(func))
        for node in func.inputs:
            key = wanted.get(id(node))
            if key is not None:
                counts[key] += 1
            if node.creator_node is not None:
                stack.append(node.creator_node)
    return counts


def _softmax(z):
    xp = get_array_module(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _one_hot(xp, labels, n_classes, dtype):
    out = xp.zeros((len(labels), n_classes), dtype=dtype)
    out[xp.arange(len(labels)), labels] = 1
    return out


class _Extraction:
    """One extraction call: the model, its resolved layout slots, the
    options, and the per-chunk work (forward, backward passes, rules,
    fallback, weight decay)."""

    def __init__(self, model, layout, strict, weight_decay):
        self.model = model
        self.layout = layout
        self.slots = _slots(model, layout)
        self.strict = strict
        self.weight_decay = float(weight_decay)
        self.dtype = np.result_type(
            *[p.dtype for s in self.slots for p in s.params])
        self.warned = set()

    def forward(self, x):
        """Forward pass in inference mode recording the selected links.
        Returns (logits Variable, {path: [calls]})."""
        recorder = _Recorder([s.link for s in self.slots])
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', True), recorder:
            z = self.model(x)
        if not isinstance(z, chainer.Variable) or z.ndim != 2 or \
                z.shape[0] != len(x):
            raise GradnetError(
                'the model must return logits of shape (n_samples, '
                f'n_classes) for x of shape {tuple(x.shape)}; it returned '
                f'{getattr(z, "shape", type(z))}')
        calls = {s.path: recorder.calls[id(s.link)] for s in self.slots}
        return z, calls

    def _fallback_reason(self, slot, calls, uses, n):
        rule = _RULES.get(type(slot.link))
        if rule is None:
            return 'has no batched per-sample rule'
        for call in calls:
            reason = rule.unsupported(slot.link, call, n)
            if reason:
                return reason
        for p in slot.params:
            if uses[id(p)] != len(calls):
                return (f'has a parameter used {uses[id(p)]} times in the '
                        f'graph but the link was called {len(calls)} times')
        return None

    def _split(self, z, calls, n):
        """Slots computed by rules and slots needing the fallback loop."""
        uses = _param_uses(z, [p for s in self.slots for p in s.params])
        batched, fallback = [], []
        for slot in self.slots:
            reason = self._fallback_reason(slot, calls[slot.path], uses, n)
            if reason is None:
                batched.append(slot)
                continue
            message = (f"link {slot.path!r} ({type(slot.link).__name__}) "
                       f"{reason}")
            if self.strict:
                raise GradnetError(
                    message + '; strict=True forbids the per-sample fallback')
            if slot.path not in self.warned:
                self.warned.add(slot.path)
                warnings.warn(
                    message + '; its per-sample gradients come from a slow '
                    'per-sample autograd loop', TangentFallbackWarning,
                    stacklevel=4)
            fallback.append(slot)
        return batched, fallback

    def _dests(self, out, n_passes, slot):
        """{name: view (n, n_passes) + shape} of the slot's columns."""
        rows = out.reshape(out.shape[0] // n_passes, n_passes, -1)
        return {e.name: rows[:, :, e.offset:e.offset + e.size].reshape(
            rows.shape[:2] + e.shape) for e in slot.entries}

    def run_chunk(self, x, z, calls, seeds, out):
        """Fill ``out`` (n * n_passes, n_params) for the chunk ``x``.

        ``z``, ``calls``: its recorded forward; ``seeds``: list of logit
        gradients (n, C), one per backward pass; row ``i * n_passes + r`` is
        sample ``i`` under ``seeds[r]``.
        """
        n = len(x)
        n_passes = len(seeds)
        batched, fallback = self._split(z, calls, n)
        recorded = [(slot, call) for slot in batched
                    for call in calls[slot.path]]
        xp = get_array_module(out)
        gys = [xp.empty((n, n_passes) + call.out.shape[1:], z.dtype)
               for _, call in recorded]
        for r, seed in enumerate(seeds):
            if not recorded:
                break
            grads = chainer.grad([z], [call.out for _, call in recorded],
                                 grad_outputs=[chainer.Variable(seed)])
            for gy, g in zip(gys, grads):   # None: output does not reach z
                gy[:, r] = 0 if g is None else g.array
        written = set()
        for (slot, call), gy in zip(recorded, gys):
            rule = _RULES[type(slot.link)]
            rule.write(slot.link, call, rule.prepare(slot.link, call), gy,
                       self._dests(out, n_passes, slot),
                       accumulate=slot.path in written)
            written.add(slot.path)
        for slot in batched:
            if slot.path not in written:   # never called: gradient 0
                for d in self._dests(out, n_passes, slot).values():
                    d[...] = 0
        if fallback:
            self._fallback(x, seeds, fallback, out)
        if self.weight_decay:
            for slot in self.slots:
                for e, p in zip(slot.entries, slot.params):
                    out[:, e.offset:e.offset + e.size] += \
                        self.weight_decay * p.array.reshape(-1)

    def sample_bytes(self, calls, n_passes):
        """Estimated bytes per sample of a chunk: its feature rows, the
        output gradients of every pass, the recorded inputs and the rules'
        work arrays (e.g. im2col columns), from a one-sample forward."""
        elements = n_passes * self.layout.n_params
        for slot in self.slots:
            rule = _RULES.get(type(slot.link))
            for call in calls[slot.path]:
                elements += n_passes * call.out[0].size + call.x[0].size
                if rule is not None:
                    elements += rule.work(slot.link, call)
        return elements * np.dtype(self.dtype).itemsize

    def _fallback(self, x, seeds, slots, out):
        """Per-sample autograd loop for ``slots`` (one forward per sample,
        one chainer.grad per row)."""
        n_passes = len(seeds)
        params = [p for s in slots for p in s.params]
        entries = [e for s in slots for e in s.entries]
        xp = get_array_module(out)
        for i in range(len(x)):
            with chainer.using_config('train', False), \
                    chainer.using_config('enable_backprop', True):
                zi = self.model(x[i:i + 1])
            for r, seed in enumerate(seeds):
                grads = chainer.grad([zi], params, grad_outputs=[
                    chainer.Variable(seed[i:i + 1])])
                row = out[i * n_passes + r]
                for e, g in zip(entries, grads):
                    dest = row[e.offset:e.offset + e.size]
                    if g is None:
                        dest[...] = 0
                    else:
                        dest[...] = xp.asarray(g.array).reshape(-1)


# --------------------------------------------------------------------------
# Public extraction API
# --------------------------------------------------------------------------

class TangentBatch(NamedTuple):
    """Rows of tangent features and what each row is.

    features: (rows, n_params) float32/float64; sample: (rows,) int64 index
    into ``x``; candidate: (rows,) int32 candidate label (for the logit
    Jacobian: the logit index); target: (rows,) int32 true label or -1.
    All in the model's array module.
    """
    features: object
    sample: object
    candidate: object
    target: object


def _check_inputs(model, x, labels):
    """Validate x (array, non-empty, same module as the model) and labels
    (None or int (n,)); returns labels as a host int64 array or None."""
    xp = get_array_module(x)
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or \
            isinstance(x, chainer.Variable):
        raise GradnetError(
            f'x must be a NumPy or CuPy array, not {type(x).__name__}')
    if x.ndim < 1 or x.shape[0] == 0:
        raise GradnetError(f'x must hold at least one sample; shape '
                           f'{tuple(x.shape)}')
    if xp is not model.xp:
        raise GradnetError(
            f'x is a {xp.__name__} array but the model lives on '
            f'{model.xp.__name__}: move one of them (model.to_device / '
            'backend.to_device)')
    if labels is None:
        return None
    return _int_labels(labels, len(x), 'labels')


def _int_labels(values, n, what):
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


class _Output:
    """Where chunk rows go: 'fresh' (a new array per chunk), 'reuse' (one
    chunk-sized buffer overwritten by every chunk) or 'whole' (slices of one
    array holding every row, kept in ``self.whole``)."""

    def __init__(self, mode):
        self.mode = mode
        self.whole = None
        self.buffer = None

    def rows(self, xp, dtype, n_params, total_rows, chunk_rows, start, n):
        if self.mode == 'fresh':
            return xp.empty((n, n_params), dtype)
        if self.mode == 'reuse':
            if self.buffer is None:
                self.buffer = xp.empty((chunk_rows, n_params), dtype)
            return self.buffer[:n]
        if self.whole is None:
            self.whole = xp.empty((total_rows, n_params), dtype)
        return self.whole[start:start + n]


def _candidate_plan(candidates, labels, n_total):
    """(mode, explicit host labels or None) for the 'ce' kind."""
    if not isinstance(candidates, str):
        return 'explicit', _int_labels(candidates, n_total, 'candidates')
    if candidates not in CANDIDATE_MODES:
        raise GradnetError(
            f'unknown candidates mode {candidates!r}: choose one of '
            f'{", ".join(CANDIDATE_MODES)} or pass a label array')
    if candidates == 'true':
        if labels is None:
            raise GradnetError("candidates='true' needs labels")
        return 'explicit', labels
    return candidates, None


def _seeds(kind, mode, z, candidates):
    """Logit gradients (n, C), one per backward pass: CE rows get
    ``softmax(z) - e_c`` (per-row candidates, or one pass per class c for
    mode 'all'); Jacobian rows get ``e_k``, one pass per class k."""
    xp = get_array_module(z)
    n, n_classes = z.shape
    if mode == 'all':
        labels = [xp.full(n, c) for c in range(n_classes)]
    else:
        labels = [xp.asarray(candidates)]
    hots = [_one_hot(xp, lab, n_classes, z.dtype) for lab in labels]
    if kind == 'jacobian':
        return hots
    p = _softmax(z)
    return [p - hot for hot in hots]


def _iterate(model, x, labels, *, kind, output, candidates='all', seed=0,
             layout=None, weight_decay=0.0, strict=False,
             max_bytes=MAX_BYTES, n_threads=None):
    """Shared driver of tangent features (kind 'ce') and the logit Jacobian
    (kind 'jacobian'). Checks every input and runs one forward pass of the
    first sample now (errors are raised here, not on the first chunk), then
    returns a generator of TangentBatch chunks."""
    labels = _check_inputs(model, x, labels)
    if n_threads is None:
        n_threads = _usable_cpus()
    elif int(n_threads) < 1:
        raise GradnetError(f'n_threads must be at least 1, not {n_threads}')
    if layout is None:
        layout = parameter_layout(model)
    ext = _Extraction(model, layout, strict, weight_decay)
    n_total = len(x)
    mode, explicit = ('all', None) if kind == 'jacobian' else \
        _candidate_plan(candidates, labels, n_total)
    z1, calls1 = ext.forward(x[:1])
    n_classes = z1.shape[1]
    _check_range(labels, n_classes, 'labels')
    _check_range(explicit, n_classes, 'candidates')
    if mode == 'random':
        rng = seed if isinstance(seed, np.random.Generator) \
            else np.random.default_rng(seed)
        explicit = rng.integers(0, n_classes, size=n_total)
    n_passes = n_classes if mode == 'all' else 1
    if max_bytes is None:
        per_chunk = n_total
    elif max_bytes <= 0:
        raise GradnetError(f'max_bytes must be positive, not {max_bytes}')
    else:
        per_chunk = min(n_total, max(1, int(max_bytes) // ext.sample_bytes(
            calls1, n_passes)))
    del z1, calls1
    return _chunks(ext, x, labels, explicit, kind, mode, n_passes, per_chunk,
                   output, int(n_threads))


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def _fill(ext, kind, mode, x, candidates, out):
    """Forward, backward passes and rules for the samples ``x``."""
    z, calls = ext.forward(x)
    ext.run_chunk(x, z, calls, _seeds(kind, mode, z.array, candidates), out)


def _fill_threaded(ext, kind, mode, x, candidates, out, n_threads):
    """:func:`_fill` over ``n_threads`` sub-batches of samples in threads,
    BLAS limited to one thread meanwhile (NumPy only; one call otherwise).
    NumPy and BLAS release the GIL, so the sub-batches run in parallel."""
    n = len(x)
    n_threads = min(n_threads, n)
    if n_threads <= 1 or ext.model.xp is not np:
        return _fill(ext, kind, mode, x, candidates, out)
    rows = len(out) // n
    bounds = np.linspace(0, n, n_threads + 1).astype(int)
    with ThreadpoolController().limit(limits=1, user_api='blas'), \
            ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(
            _fill, ext, kind, mode, x[a:b],
            None if candidates is None else candidates[a:b],
            out[a * rows:b * rows]) for a, b in zip(bounds, bounds[1:])]
        for future in futures:
            future.result()


def _chunks(ext, x, labels, explicit, kind, mode, n_passes, per_chunk,
            output, n_threads):
    xp = ext.model.xp
    n_total = len(x)
    n_params = ext.layout.n_params
    for start in range(0, n_total, per_chunk):
        stop = min(n_total, start + per_chunk)
        n = stop - start
        out = output.rows(xp, ext.dtype, n_params, n_total * n_passes,
                          per_chunk * n_passes, start * n_passes,
                          n * n_passes)
        cand = None if explicit is None else explicit[start:stop]
        _fill_threaded(ext, kind, mode, x[start:stop], cand, out, n_threads)
        sample = np.repeat(np.arange(start, stop, dtype=np.int64), n_passes)
        if mode == 'all':
            candidate = np.tile(np.arange(n_passes, dtype=np.int32), n)
        else:
            candidate = cand.astype(np.int32)
        target = np.full(n * n_passes, -1, np.int32) if labels is None \
            else np.repeat(labels[start:stop], n_passes).astype(np.int32)
        yield TangentBatch(out, xp.asarray(sample), xp.asarray(candidate),
                           xp.asarray(target))


def _collect(chunks, output):
    """One TangentBatch of every row, the features being ``output.whole``."""
    chunks = list(chunks)
    xp = get_array_module(chunks[0].features)
    meta = [xp.concatenate(parts) for parts in list(zip(*chunks))[1:]]
    return TangentBatch(output.whole, *meta)


def iter_tangent_features(model, x, labels=None, candidates='random', *,
                          layout=None, seed=0, weight_decay=0.0,
                          strict=False, max_bytes=MAX_BYTES, n_threads=None,
                          reuse_buffer=False):
    """Tangent features in chunks of whole samples.

    model: a Chainer Link returning logits (n, C). x: array (N, ...) in the
    model's array module. labels: int (N,) true labels or None.
    candidates: 'true' | 'random' | 'all' | int array (N,). layout: a
    ParameterLayout (default ``parameter_layout(model)``). seed: int or
    np.random.Generator for 'random'. weight_decay: adds
    ``weight_decay * theta`` to every row's gradient of each selected
    parameter (as Chainer's WeightDecay hook would). strict: raise instead of
    the per-sample fallback. max_bytes: working-set budget of one chunk
    (see the module docstring; None: one chunk). n_threads: on the CPU,
    each chunk is split into this many sub-batches computed in parallel
    threads with single-threaded BLAS (default: the CPUs this process may
    use; 1: no threads; ignored for CuPy). reuse_buffer: yield views into
    one buffer overwritten by the next chunk (saves fresh-memory page faults
    when the consumer copies or reduces each chunk before asking for the
    next).

    Yields :class:`TangentBatch` chunks; rows are sample-major.
    """
    return _iterate(
        model, x, labels, kind='ce', candidates=candidates, seed=seed,
        layout=layout, weight_decay=weight_decay, strict=strict,
        max_bytes=max_bytes, n_threads=n_threads,
        output=_Output('reuse' if reuse_buffer else 'fresh'))


def tangent_features(model, x, labels=None, candidates='random', *,
                     layout=None, seed=0, weight_decay=0.0, strict=False,
                     max_bytes=MAX_BYTES, n_threads=None):
    """All tangent-feature rows of ``x`` at once (see
    :func:`iter_tangent_features` for the arguments; ``max_bytes`` bounds the
    working chunk, the result holds every row). Returns a TangentBatch with
    features (rows, n_params): N rows, or N*C for ``candidates='all'``."""
    output = _Output('whole')
    return _collect(_iterate(
        model, x, labels, kind='ce', candidates=candidates, seed=seed,
        layout=layout, weight_decay=weight_decay, strict=strict,
        max_bytes=max_bytes, n_threads=n_threads, output=output), output)


def iter_logit_jacobian(model, x, labels=None, *, layout=None, strict=False,
                        max_bytes=MAX_BYTES, n_threads=None,
                        reuse_buffer=False):
    """Per-sample Jacobian rows of the logits in chunks: TangentBatch rows
    ``i*C + k`` hold d z_ik / d theta (``candidate`` = k; ``target`` the
    label or -1). Arguments as :func:`iter_tangent_features`."""
    return _iterate(
        model, x, labels, kind='jacobian', layout=layout, strict=strict,
        max_bytes=max_bytes, n_threads=n_threads,
        output=_Output('reuse' if reuse_buffer else 'fresh'))


def logit_jacobian(model, x, *, layout=None, strict=False,
                   max_bytes=MAX_BYTES, n_threads=None):
    """d z / d theta per sample: array (N, C, n_params) in the model's array
    module, ``[i, k]`` = gradient of logit k of sample i w.r.t. the layout's
    parameters."""
    output = _Output('whole')
    for _ in _iterate(model, x, None, kind='jacobian', layout=layout,
                      strict=strict, max_bytes=max_bytes,
                      n_threads=n_threads, output=output):
        pass
    return output.whole.reshape(len(x), -1, output.whole.shape[1])
