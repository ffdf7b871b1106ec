"""Settings for tests/test_tangent_rules.py: one small link per setting.

Each setting is a dict:

* ``link``: the link class; ``kwargs``: its constructor's arguments;
* ``input_shape``: one sample's input shape (the batch axis is added);
  ``ids``: the integer id range [low, high) for an EmbedID input (float
  input otherwise);
* ``call_kwargs``: extra keyword arguments of the link's call (default none);
* ``layout``: the ``parameter_layout`` options selecting the link's
  parameters (the Linear head is selected by the default options);
* ``rule``: the rule class :func:`~gradnet_cupy.tangent.rule_for` gives, or
  None for a link type without a rule;
* ``batched``: False where the per-sample fallback computes the link (a
  link type without a rule), which must agree with autograd as well
  (default True);
* ``id``: the test id.
"""
from gradnet_cupy.chainer_compat import L
from gradnet_cupy.tangent import (
    BatchNormalizationRule, Convolution2DRule, Deconvolution2DRule,
    EmbedIDRule, LinearRule)

BIAS = dict(include_bias=True)

SETTINGS = [
    # Linear: one batch axis (x flattened), two batch axes, with and
    # without a bias, a lazily sized input
    dict(link=L.Linear, kwargs=dict(in_size=5, out_size=4),
         input_shape=(5,), layout=BIAS, rule=LinearRule, id='linear-bias'),
    dict(link=L.Linear, kwargs=dict(in_size=5, out_size=4, nobias=True),
         input_shape=(5,), layout=BIAS, rule=LinearRule, id='linear-nobias'),
    dict(link=L.Linear, kwargs=dict(in_size=5, out_size=4),
         input_shape=(5,), layout=dict(), rule=LinearRule,
         id='linear-bias-unselected'),
    dict(link=L.Linear, kwargs=dict(in_size=None, out_size=3),
         input_shape=(2, 3, 2), layout=BIAS, rule=LinearRule,
         id='linear-flatten'),
    dict(link=L.Linear, kwargs=dict(in_size=5, out_size=4),
         input_shape=(3, 5), call_kwargs=dict(n_batch_axes=2), layout=BIAS,
         rule=LinearRule, id='linear-2-batch-axes'),
    # Convolution2D: stride, (asymmetric) pad, dilation, groups
    dict(link=L.Convolution2D, kwargs=dict(in_channels=2, out_channels=3,
                                           ksize=3),
         input_shape=(2, 6, 5), layout=BIAS, rule=Convolution2DRule,
         id='conv2d'),
    dict(link=L.Convolution2D, kwargs=dict(in_channels=2, out_channels=3,
                                           ksize=(3, 2), stride=2,
                                           pad=(1, 2), nobias=True),
         input_shape=(2, 7, 6), layout=BIAS, rule=Convolution2DRule,
         id='conv2d-stride-pad-nobias'),
    dict(link=L.Convolution2D, kwargs=dict(in_channels=2, out_channels=4,
                                           ksize=3, pad=1, dilate=2),
         input_shape=(2, 7, 7), layout=BIAS, rule=Convolution2DRule,
         id='conv2d-dilate'),
    dict(link=L.Convolution2D, kwargs=dict(in_channels=4, out_channels=6,
                                           ksize=3, stride=(1, 2), pad=1,
                                           dilate=(2, 1), groups=2),
         input_shape=(4, 6, 7), layout=BIAS, rule=Convolution2DRule,
         id='conv2d-groups-stride-dilate'),
    dict(link=L.Convolution2D, kwargs=dict(in_channels=3, out_channels=3,
                                           ksize=2, groups=3),
         input_shape=(3, 4, 5), layout=BIAS, rule=Convolution2DRule,
         id='conv2d-depthwise'),
    # Deconvolution2D (selected with include_deconvolution)
    dict(link=L.Deconvolution2D, kwargs=dict(in_channels=2, out_channels=3,
                                             ksize=3),
         input_shape=(2, 4, 3),
         layout=dict(include_bias=True, include_deconvolution=True),
         rule=Deconvolution2DRule, id='deconv2d'),
    dict(link=L.Deconvolution2D, kwargs=dict(in_channels=4, out_channels=2,
                                             ksize=(3, 2), stride=2, pad=1,
                                             groups=2, nobias=True),
         input_shape=(4, 3, 4),
         layout=dict(include_bias=True, include_deconvolution=True),
         rule=Deconvolution2DRule, id='deconv2d-stride-pad-groups'),
    dict(link=L.Deconvolution2D, kwargs=dict(in_channels=2, out_channels=2,
                                             ksize=2, stride=(2, 1),
                                             dilate=2),
         input_shape=(2, 3, 3),
         layout=dict(include_bias=True, include_deconvolution=True),
         rule=Deconvolution2DRule, id='deconv2d-dilate'),
    # BatchNormalization in inference mode (running statistics)
    dict(link=L.BatchNormalization, kwargs=dict(size=4),
         input_shape=(4,), layout=dict(include_batchnorm=True),
         rule=BatchNormalizationRule, id='batchnorm-features'),
    dict(link=L.BatchNormalization, kwargs=dict(size=3),
         input_shape=(3, 4, 2), layout=dict(include_batchnorm=True),
         rule=BatchNormalizationRule, id='batchnorm-channels'),
    dict(link=L.BatchNormalization, kwargs=dict(size=(3, 4)),
         input_shape=(3, 4, 2), layout=dict(include_batchnorm=True),
         rule=BatchNormalizationRule, id='batchnorm-2d-size'),
    dict(link=L.BatchNormalization, kwargs=dict(axis=(0, 2)),
         input_shape=(3, 4), layout=dict(include_batchnorm=True),
         rule=BatchNormalizationRule, id='batchnorm-axis'),
    # EmbedID (selected with include_embed_id), with and without ignore_label
    dict(link=L.EmbedID, kwargs=dict(in_size=6, out_size=3),
         input_shape=(4,), ids=(0, 6), layout=dict(include_embed_id=True),
         rule=EmbedIDRule, id='embed'),
    dict(link=L.EmbedID, kwargs=dict(in_size=5, out_size=2, ignore_label=-1),
         input_shape=(2, 3), ids=(-1, 5), layout=dict(include_embed_id=True),
         rule=EmbedIDRule, id='embed-ignore-label'),
    # ConvolutionND has no rule: the per-sample fallback computes it
    dict(link=L.ConvolutionND, kwargs=dict(ndim=1, in_channels=2,
                                           out_channels=3, ksize=3,
                                           stride=2, pad=1),
         input_shape=(2, 7), layout=dict(include_bias=True,
                                         links=['/link', '/head']),
         rule=None, batched=False, id='convnd-1d-fallback'),
    dict(link=L.ConvolutionND, kwargs=dict(ndim=3, in_channels=1,
                                           out_channels=2, ksize=2),
         input_shape=(1, 3, 3, 3), layout=dict(include_bias=True,
                                               links=['/link', '/head']),
         rule=None, batched=False, id='convnd-3d-fallback'),
]
