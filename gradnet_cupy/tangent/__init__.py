"""Per-sample tangent features of a Chainer classifier (docs/method.rst#tangent-features).

For a model ``f`` returning logits ``z = f(x)`` of shape (n, C), an input
batch ``x`` and one candidate label ``c`` per row, the tangent feature of a
row is the per-sample gradient of the softmax cross-entropy

    t(x_i, c) = d CE(softmax(z_i), c) / d theta      (one row of n_params)

with respect to the parameters selected by a :class:`ParameterLayout`. The
loss is per sample (never batch-averaged), the model always runs in inference
mode (``chainer.config.train = False``: BatchNormalization uses its running
statistics, Dropout is off), so samples do not interact.

Modules
-------
:mod:`~gradnet_cupy.tangent.layout`
    which parameters, in which order: ``parameter_layout(model, *,
    include_bias=False, include_batchnorm=False, include_deconvolution=False,
    include_embed_id=False, links=None)`` -> :class:`ParameterLayout` (one
    block per link, blocks in the model's definition order; its
    ``block_sizes`` are the per-layer ``sizes`` used downstream; JSON-able
    via ``to_dict``/``from_dict``).
:mod:`~gradnet_cupy.tangent.rules`
    the per-layer math: a documented :class:`Rule` per supported link type
    (``Linear``, ``Convolution2D``, ``Deconvolution2D``,
    ``BatchNormalization``, ``EmbedID``); :func:`register_rule` adds a rule
    for a user's link class, :func:`rule_for` looks one up.
:mod:`~gradnet_cupy.tangent.source`
    the :class:`TangentSource` interface (what extraction needs from a
    model: rows of given candidates in chunks of whole samples, and the
    layout), :class:`TangentBatch`, ``CANDIDATE_MODES``, ``MAX_BYTES`` and
    the row order and chunking every source shares.
:mod:`~gradnet_cupy.tangent.chainer_source`, :mod:`~gradnet_cupy.tangent.torch_source`
    the two sources: :class:`ChainerSource` (the engine below) and
    ``TorchSource`` (a ``torch.nn.Module`` through ``torch.func``; imports
    torch only when used, docs/torch.rst).
:mod:`~gradnet_cupy.tangent.engine`
    the extraction: ``tangent_features(model, x, labels=None,
    candidates='random', *, layout=None, seed=0, weight_decay=0.0,
    strict=False, max_bytes=MAX_BYTES, n_threads=None)`` ->
    :class:`TangentBatch` with every row at once; ``iter_tangent_features``
    (same arguments, ``reuse_buffer=False``) -> its chunks of whole samples;
    ``logit_jacobian(model, x, ...)`` -> array (n, C, n_params), ``[i, k]``
    = d z_ik / d theta, and ``iter_logit_jacobian`` -> its chunks as
    TangentBatch (``candidate`` = logit index ``k``). Links without a rule
    are computed by a per-sample loop with a :class:`TangentFallbackWarning`
    (``strict=True`` raises instead).

Candidates (``candidates=``): ``'true'`` (the label, needs ``labels``),
``'random'`` (uniform over the classes, drawn once for the whole ``x`` from
``np.random.default_rng(seed)`` or a given ``np.random.Generator``),
``'all'`` (C rows per sample, sample-major: row ``i*C + c`` is sample ``i``
with candidate ``c``), or an integer array of shape (n,).
Objectives (``objective=``): the default :data:`CROSS_ENTROPY` above; any
:class:`Objective` (``seeds(z, candidates)``: the per-row output gradients
of a per-sample scalar objective) replaces it. An unsupervised objective
(``uses_candidates = False``, e.g. ``OutputSum('free-energy')`` for a model
returning one scalar per sample, such as :class:`gradnet_cupy.rbm.RBM`)
gives one row per sample with ``candidate = -1``.
``weight_decay`` adds ``weight_decay * theta`` to every selected parameter's
gradient (off by default).

Errors (GradnetError) are raised when the function is called, iterators
included: every input is checked and the first sample is run forward once
(to learn the number of classes) before any chunk is computed.

Dtypes: features have the selected parameters' dtype (float32 for a float32
model, float64 for a float64 one) and live in the model's array module
(NumPy or CuPy, the same as ``x``); ``sample`` is int64, ``candidate`` and
``target`` are int32 (``target`` is -1 where no labels were given).

Assumption (not checkable cheaply): in inference mode the model processes
samples independently (true for ordinary feed-forward classifiers).
"""
from gradnet_cupy.tangent.source import (
    CANDIDATE_MODES, MAX_BYTES, TangentBatch, TangentSource)
from gradnet_cupy.tangent.engine import (
    CROSS_ENTROPY, CrossEntropy, Objective, OutputSum,
    TangentFallbackWarning, iter_logit_jacobian, iter_tangent_features,
    logit_jacobian, tangent_features)
from gradnet_cupy.tangent.chainer_source import ChainerSource
from gradnet_cupy.tangent.layout import (
    ParameterEntry, ParameterLayout, parameter_layout)
from gradnet_cupy.tangent.rules import (
    BatchNormalizationRule, Call, Convolution2DRule, Deconvolution2DRule,
    EmbedIDRule, LinearRule, Rule, register_rule, rule_for)

__all__ = [
    'CANDIDATE_MODES', 'CROSS_ENTROPY', 'MAX_BYTES', 'CrossEntropy',
    'Objective', 'OutputSum', 'TangentBatch', 'TangentFallbackWarning',
    'iter_logit_jacobian', 'iter_tangent_features', 'logit_jacobian',
    'tangent_features',
    'ParameterEntry', 'ParameterLayout', 'parameter_layout',
    'BatchNormalizationRule', 'Call', 'Convolution2DRule',
    'Deconvolution2DRule', 'EmbedIDRule', 'LinearRule', 'Rule',
    'register_rule', 'rule_for',
    'TangentSource', 'ChainerSource',
]   # TorchSource is not in __all__: a star import must not need torch


def __getattr__(name):
    """``TorchSource`` imports torch: only when asked for."""
    if name == 'TorchSource':
        from gradnet_cupy.tangent.torch_source import TorchSource
        return TorchSource
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
