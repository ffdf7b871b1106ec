"""Each per-layer rule alone against Chainer's autograd, and register_rule.

Every setting of tests/tangent_rule_settings.py is one link wrapped in a
tiny chain (the link, tanh, a Linear head to C classes); its tangent
features (float64, every candidate) must equal the gradients Chainer's
autograd gives one sample and one candidate at a time (relative error
``max|A - B| / max|B|`` <= 1e-10, as in tests/test_tangent.py).
"""
import warnings

import numpy as np
import pytest

from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.tangent import (
    LinearRule, Rule, TangentFallbackWarning, parameter_layout, register_rule,
    rule_for, tangent_features)
from tangent_rule_settings import SETTINGS
from test_tangent import Scale, oracle, randomize_batchnorm, rel_err

C = 3
TOL = 1e-10


class Tiny(chainer.Chain):
    """``head(tanh(link(x, **call_kwargs)))``: logits (n, C).

    A float input enters as a Variable that requires its gradient: Chainer
    7.8.1's Deconvolution2D backward fails when only W's gradient is asked
    for (it passes arrays where shapes are expected), as for a first layer
    fed a plain array.
    """

    def __init__(self, link, call_kwargs=None):
        super().__init__()
        self.call_kwargs = call_kwargs or {}
        with self.init_scope():
            self.link = link
            self.head = L.Linear(None, C)

    def forward(self, x):
        if x.dtype.kind == 'f':
            x = chainer.Variable(x)
        return self.head(F.tanh(self.link(x, **self.call_kwargs)))


def build(make_link, input_shape, call_kwargs=None, ids=None, n=3, seed=0):
    """A float64 Tiny chain around ``make_link()`` (parameters initialized,
    BatchNormalization statistics randomized) and an input of n samples."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)      # Chainer's initializers draw from it
    with chainer.using_config('dtype', np.float64):
        model = Tiny(make_link(), call_kwargs)
        if ids is None:
            x = rng.standard_normal((n,) + input_shape)
        else:
            x = rng.integers(*ids, size=(n,) + input_shape).astype(np.int32)
        with chainer.using_config('train', False):
            model(x)          # initializes lazy parameters
    randomize_batchnorm(model, rng)
    return model, x


def autograd_rows(model, x, layout):
    """The oracle's rows for every (sample, candidate), sample-major."""
    return oracle(model, x, [(i, c) for i in range(len(x)) for c in range(C)],
                  layout)


@pytest.mark.parametrize('setting', SETTINGS, ids=[s['id'] for s in SETTINGS])
def test_rule_matches_autograd(setting):
    model, x = build(lambda: setting['link'](**setting['kwargs']),
                     setting['input_shape'], setting.get('call_kwargs'),
                     setting.get('ids'))
    rule = rule_for(model.link)
    if setting['rule'] is None:
        assert rule is None
    else:
        assert type(rule) is setting['rule']
    layout = parameter_layout(model, **setting['layout'])
    assert layout.block_paths == ('/link', '/head')
    if setting.get('batched', True):
        with warnings.catch_warnings():
            warnings.simplefilter('error', TangentFallbackWarning)
            batch = tangent_features(model, x, candidates='all',
                                     layout=layout)
    else:
        with pytest.warns(TangentFallbackWarning, match="'/link'"):
            batch = tangent_features(model, x, candidates='all',
                                     layout=layout)
    assert batch.features.dtype == np.float64
    assert rel_err(batch.features, autograd_rows(model, x, layout)) <= TOL


# ------------------------------------------------------------ register_rule

def scale_class():
    """A new user link class (registration is global: one class per test),
    tests/test_tangent.py's ``Scale``: ``y = x * s``, s of shape (d,),
    x (n, d)."""
    return type('UserScale', (Scale,), {})


class ScaleRule(Rule):
    """``y = x * s``: s (d,), x (n, d), gy (n, R, d) -> ds[i, r] = gy[i, r]
    * x[i], (n, R, d)."""
    params = ('s',)

    def write(self, link, call, cache, gy, dests, accumulate):
        value = gy * call.x[:, None]
        if accumulate:
            dests['s'] += value
        else:
            dests['s'][...] = value


def scale_model(cls):
    model, x = build(lambda: cls(4), (4,))
    return model, x, parameter_layout(model, links=['/link', '/head'])


def test_registered_user_rule_matches_autograd():
    cls = scale_class()
    rule = ScaleRule()
    register_rule(cls, rule)
    model, x, layout = scale_model(cls)
    assert rule_for(model.link) is rule
    assert [e.name for e in layout.entries if e.path == '/link'] == ['s']
    with warnings.catch_warnings():
        warnings.simplefilter('error', TangentFallbackWarning)
        batch = tangent_features(model, x, candidates='all', layout=layout,
                                 strict=True)
    assert rel_err(batch.features, autograd_rows(model, x, layout)) <= TOL


def test_unregistered_user_link_falls_back():
    """Without a rule of its own class (a subclass of a registered class
    included) a user link is computed by the fallback, or refused by
    strict=True, as before register_rule existed."""
    registered = scale_class()
    register_rule(registered, ScaleRule())

    class SubScale(registered):
        pass

    for cls in (scale_class(), SubScale):
        model, x, layout = scale_model(cls)
        assert rule_for(model.link) is None
        with pytest.warns(TangentFallbackWarning,
                          match="'/link' .* has no batched per-sample rule"):
            batch = tangent_features(model, x, candidates='all',
                                     layout=layout)
        assert rel_err(batch.features, autograd_rows(model, x, layout)) \
            <= TOL
        with pytest.raises(GradnetError, match='strict=True'):
            tangent_features(model, x, candidates='all', layout=layout,
                             strict=True)


@pytest.mark.parametrize('link_class,rule,message', [
    (object, ScaleRule(), 'needs a chainer.Link subclass, not the class '
                          'object'),
    (L.Linear(2, 3), ScaleRule(), 'needs a chainer.Link subclass, not a '
                                  'Linear'),
    (L.Linear, LinearRule, 'needs a Rule instance for Linear, not the class '
                           'LinearRule'),
    (L.Linear, np.eye(3), 'needs a Rule instance for Linear, not a ndarray'),
], ids=['not-a-link', 'link-instance', 'rule-class', 'not-a-rule'])
def test_register_rule_rejects_what_is_not_a_link_class_and_rule(
        link_class, rule, message):
    before = rule_for(L.Linear(2, 3))
    with pytest.raises(GradnetError) as info:
        register_rule(link_class, rule)
    assert str(info.value).startswith('register_rule ' + message)
    assert '\n' not in str(info.value)
    assert rule_for(L.Linear(2, 3)) is before
