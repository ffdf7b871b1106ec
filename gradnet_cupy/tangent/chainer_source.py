"""A Chainer model as a :class:`~gradnet_cupy.tangent.source.TangentSource`
(docs/torch.rst#the-source-interface).

Job: the thin adapter that lets the extraction stage treat the Chainer
engine (:mod:`gradnet_cupy.tangent.engine`) like any other source: it holds
the model, its layout, the objective and the engine's own options and hands
:meth:`ChainerSource.iter_rows` to :func:`iter_tangent_features` unchanged,
so the rows are the engine's, bit for bit.
"""
from gradnet_cupy.tangent.engine import (
    CROSS_ENTROPY, iter_tangent_features)
from gradnet_cupy.tangent.layout import parameter_layout
from gradnet_cupy.tangent.source import MAX_BYTES, TangentSource


class ChainerSource(TangentSource):
    """Rows of a Chainer model by the batched engine.

    model: a Chainer Link (on the CPU or the GPU) returning the objective's
    output (logits (n, C) for the default cross-entropy). layout: a
    ParameterLayout (default ``parameter_layout(model)``: W of every
    Linear/Convolution2D). objective: an
    :class:`~gradnet_cupy.tangent.Objective` (default cross-entropy).
    engine_options: ``weight_decay``, ``strict``, ``n_threads`` of
    :func:`~gradnet_cupy.tangent.iter_tangent_features`.
    """

    framework = 'chainer'

    def __init__(self, model, layout=None, objective=CROSS_ENTROPY,
                 **engine_options):
        self.model = model
        self.layout = parameter_layout(model) if layout is None else layout
        self.objective = objective
        self.engine_options = engine_options

    def iter_rows(self, x, labels=None, candidates='random', *, seed=0,
                  max_bytes=MAX_BYTES, reuse_buffer=False):
        return iter_tangent_features(
            self.model, x, labels, candidates, objective=self.objective,
            layout=self.layout, seed=seed, max_bytes=max_bytes,
            reuse_buffer=reuse_buffer, **self.engine_options)
