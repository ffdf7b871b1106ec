"""Fisher-score features of an RBM: per-sample ``grad log p(v)``, centred,
and the diagonal Fisher scaling.

Job: for an :class:`~gradnet_cupy.rbm.model.RBM` with parameters theta,

    grad_theta log p(v) = -grad_theta F(v) + E_model[grad_theta F].

The first term comes from the tangent engine with the unsupervised
objective :data:`FREE_ENERGY` (the model outputs F(v) per sample, the
engine's Linear rule gives the per-sample gradients, no per-sample loop);
the second is a constant vector estimated from Gibbs chains of the model
(:func:`model_expectation`: by default 100 chains from uniform random
states, 1,000 burn-in sweeps, then 10 samples per chain every 10 sweeps,
1,000 samples; its standard error from the spread of the per-chain means),
or enumerated exactly for a tiny RBM (:func:`exact_expectation`). It is
subtracted as centring (:func:`fisher_scores`).

Normalization as in the paper: the Fisher information ``E[s s']`` is
approximated by its diagonal, estimated on training rows
(:class:`DiagonalFisher`: each coordinate divided by its root mean square
score), after which the package's sparsification and normalizations apply
as for any tangent feature; the block-diagonal metric of
:mod:`gradnet_cupy.normalize` (``--normalize metric``) is the non-diagonal
option.

Neighbours: :mod:`.model` (F(v), Gibbs steps), :mod:`gradnet_cupy.tangent`
(the engine and the layout), :mod:`.commands` (``extract --arch rbm``).
"""
import itertools

import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.rbm.model import RBM, check_binary
from gradnet_cupy.tangent import (
    CrossEntropy, Objective, OutputSum, iter_tangent_features,
    parameter_layout)

FREE_ENERGY = OutputSum('free-energy')
"""The tangent objective ``l(v) = F(v)`` (the RBM's own output)."""

OBJECTIVES = {'cross-entropy': CrossEntropy(), 'free-energy': FREE_ENERGY}
"""The objectives ``extract --objective`` offers, by name."""

GIBBS_CHAINS = 100
GIBBS_BURN_IN = 1000
GIBBS_SAMPLES_PER_CHAIN = 10
GIBBS_THIN = 10
MAX_ENUMERATED_VISIBLE = 20


def check_objective_for(model, objective):
    """Raise a one-line :class:`GradnetError` when ``objective`` does not
    fit ``model``: a supervised objective on an RBM, or an unsupervised one
    on a classifier (the engine's own shape check catches other models)."""
    if not isinstance(objective, Objective):
        raise GradnetError(f'unknown objective {objective!r}')
    if isinstance(model, RBM) and objective.uses_candidates:
        raise GradnetError(
            f'objective {objective.name!r} needs a classifier; an RBM has no '
            'labels: use --objective free-energy')
    if not isinstance(model, RBM) and objective is FREE_ENERGY:
        raise GradnetError(
            f'objective {objective.name!r} needs an RBM (--arch rbm); '
            f'{type(model).__name__} is a classifier: use --objective '
            'cross-entropy')


def rbm_layout(rbm, visible_bias=True, hidden_bias=True):
    """The RBM's feature columns: ``W`` (H*V) always, then the hidden bias
    ``c`` (H) when ``hidden_bias``, then the visible bias ``b`` (V) when
    ``visible_bias`` (block ``/visible``). A ParameterLayout."""
    links = ['/hidden'] + (['/visible'] if visible_bias else [])
    return parameter_layout(rbm, include_bias=hidden_bias, links=links)


def free_energy_gradients(rbm, v, layout=None, **options):
    """Per-sample ``grad_theta F(v)``: (n, n_params) array in the model's
    module and dtype, for binary v (n, V); ``options`` go to
    :func:`gradnet_cupy.tangent.iter_tangent_features`."""
    check_binary(v)
    layout = rbm_layout(rbm) if layout is None else layout
    chunks = iter_tangent_features(rbm, v.astype(rbm.W.dtype, copy=False),
                                   objective=FREE_ENERGY, layout=layout,
                                   **options)
    return rbm.xp.concatenate([c.features for c in chunks])


def gibbs_samples(rbm, n_chains=GIBBS_CHAINS, burn_in=GIBBS_BURN_IN,
                  samples_per_chain=GIBBS_SAMPLES_PER_CHAIN, thin=GIBBS_THIN,
                  seed=0):
    """Samples of the model: ``(v (samples_per_chain, n_chains, V), )``
    from ``n_chains`` independent chains started at uniform random binary
    states, after ``burn_in`` sweeps, one every ``thin`` sweeps. Array in
    the model's module and dtype."""
    if min(n_chains, samples_per_chain, thin) < 1 or burn_in < 0:
        raise GradnetError('Gibbs sampling needs n_chains, samples_per_chain '
                           'and thin >= 1, burn_in >= 0')
    xp = rbm.xp
    dtype = rbm.W.dtype
    random = xp.random.RandomState(seed)
    v = (random.uniform(size=(n_chains, rbm.n_visible)) < 0.5).astype(dtype)
    out = xp.empty((samples_per_chain, n_chains, rbm.n_visible), dtype)

    def sweep(v):
        return rbm.gibbs_step(
            v, random.uniform(size=(n_chains, rbm.n_hidden)).astype(dtype),
            random.uniform(size=(n_chains, rbm.n_visible)).astype(dtype))[1]

    for _ in range(burn_in):
        v = sweep(v)
    for s in range(samples_per_chain):
        for _ in range(thin):
            v = sweep(v)
        out[s] = v
    return out


def model_expectation(rbm, layout=None, seed=0, **gibbs):
    """Gibbs estimate of ``E_model[grad_theta F]``: ``(mean, stderr)``, two
    (n_params,) float64 host arrays; ``stderr`` is the standard deviation of
    the per-chain means over sqrt(n_chains). ``gibbs``: the arguments of
    :func:`gibbs_samples` (defaults: 100 chains x 10 samples)."""
    samples = gibbs_samples(rbm, seed=seed, **gibbs)
    n_per, n_chains, n_visible = samples.shape
    grads = to_numpy(free_energy_gradients(
        rbm, samples.reshape(-1, n_visible), layout)).astype(np.float64)
    per_chain = grads.reshape(n_per, n_chains, -1).mean(axis=0)
    mean = per_chain.mean(axis=0)
    stderr = per_chain.std(axis=0, ddof=1) / np.sqrt(n_chains) \
        if n_chains > 1 else np.full_like(mean, np.inf)
    return mean, stderr


def exact_expectation(rbm, layout=None):
    """``E_model[grad_theta F]`` by enumerating every visible state (at most
    2**20): (n_params,) float64 host array."""
    if rbm.n_visible > MAX_ENUMERATED_VISIBLE:
        raise GradnetError(f'cannot enumerate 2^{rbm.n_visible} visible '
                           'states')
    states = np.array(list(itertools.product((0, 1), repeat=rbm.n_visible)),
                      dtype=rbm.W.dtype)
    states = rbm.xp.asarray(states)
    free = to_numpy(rbm.free_energy(states)).astype(np.float64)
    weight = np.exp(-(free - free.min()))
    weight /= weight.sum()
    grads = to_numpy(free_energy_gradients(rbm, states, layout))
    return weight @ grads.astype(np.float64)


def fisher_scores(rbm, v, centre, layout=None, **options):
    """Per-sample Fisher scores ``grad log p(v) = centre - grad F(v)``:
    (n, n_params) array in the model's module and dtype. ``centre``: the
    (n_params,) ``E_model[grad F]`` of :func:`model_expectation` or
    :func:`exact_expectation`."""
    grads = free_energy_gradients(rbm, v, layout, **options)
    centre = rbm.xp.asarray(centre, dtype=grads.dtype)
    if centre.shape != grads.shape[1:]:
        raise GradnetError(f'centre of shape {centre.shape} does not match '
                           f'{grads.shape[1]} feature columns')
    return centre - grads


class DiagonalFisher:
    """The diagonal approximation of the Fisher information, fitted on
    training scores: ``scale_j = 1 / sqrt(mean_i s_ij^2 + damping * mean_j
    mean_i s_ij^2)``; ``apply(s)`` returns ``s * scale`` (same module and
    dtype as ``s``, (n, n_params)). ``scale``: float64 host (n_params,)."""

    def __init__(self, scale):
        self.scale = np.asarray(scale, dtype=np.float64)

    @classmethod
    def fit(cls, scores, damping=1e-3):
        """Fit on training scores: an array (n, n_params) or an iterable of
        such chunks (one pass, any array module)."""
        if hasattr(scores, 'shape'):
            scores = [scores]
        total, rows = 0.0, 0
        for chunk in scores:
            s = to_numpy(chunk).astype(np.float64)
            total = total + (s * s).sum(axis=0)
            rows += len(s)
        if not rows:
            raise GradnetError('no training scores to fit the Fisher scaling')
        second = total / rows
        return cls(1 / np.sqrt(second + damping * second.mean()))

    def apply(self, scores):
        xp = get_array_module(scores)
        if scores.shape[1:] != self.scale.shape:
            raise GradnetError(f'scores with {scores.shape[1]} columns; the '
                               f'Fisher scaling has {self.scale.size}')
        return scores * xp.asarray(self.scale, dtype=scores.dtype)
