"""gradnet_cupy.geodesic against independent oracles (issue #15).

Oracles: the dense solve ``np.linalg.solve(J^T J + mu I, v) * beta / 2`` for
the step, the norm constraint itself for ``mu``, sorting by hand for the
projections, Chainer's own forward pass for the weight vector.
"""
import numpy as np
import pytest

from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.geodesic import (
    BlockSolver, MagnitudeTarget, StructuredTarget, WalkSettings,
    WeightsTarget, anchored_direction, exact_step, get_weights, interpolate,
    layout_of, one_shot, prune_finetune, same_architecture, set_weights,
    solve_mu, walk)
from gradnet_cupy.tangent import logit_jacobian

EPS = 0.01


class Tiny(chainer.Chain):
    """12 -> 8 -> 3 with ReLU, on (n, 1, 3, 4) input."""
    in_shape = (1, 3, 4)

    def __init__(self, dtype=np.float64, seed=0):
        super().__init__()
        init = chainer.initializers.Normal(0.5, dtype=dtype)
        with self.init_scope():
            self.l1 = L.Linear(12, 8, initialW=init, initial_bias=init)
            self.l2 = L.Linear(8, 3, initialW=init, initial_bias=init)
        rng = np.random.RandomState(seed)
        for p in self.params():
            p.array[...] = rng.normal(0, 0.5, p.shape)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)))


class OneLayer(chainer.Chain):
    """A single Linear 12 -> 3: one block per layer."""
    in_shape = (1, 3, 4)

    def __init__(self, dtype=np.float64, seed=0):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(12, 3, initialW=chainer.initializers.Normal(
                0.5, dtype=dtype), initial_bias=chainer.initializers.Zero(
                dtype))
        rng = np.random.RandomState(seed)
        self.fc.W.array[...] = rng.normal(0, 0.5, self.fc.W.shape)

    def forward(self, x):
        return self.fc(x)


def inputs(n, dtype=np.float64, seed=1):
    return np.random.default_rng(seed).normal(
        size=(n, 1, 3, 4)).astype(dtype)


def jacobian_rows(model, x):
    J = logit_jacobian(model, x, layout=layout_of(model))
    return J.reshape(-1, J.shape[-1])


def unit(v):
    return v / np.linalg.norm(v)


def dense_step(J, v, mu, beta):
    n = J.shape[1]
    return np.linalg.solve(J.T @ J + mu * np.eye(n), v) * beta / 2


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ------------------------------------------------------------------- step

@pytest.mark.parametrize('beta', [0.05, 1.0, 20.0])
def test_exact_step_equals_dense_solve(beta):
    model = Tiny()
    J = jacobian_rows(model, inputs(3))            # 9 rows, 120 columns
    v = unit(np.random.default_rng(2).normal(size=J.shape[1]))
    step = exact_step(J, v, beta, EPS)
    assert step.mu > 0                             # n > rows: the ball binds
    assert rel(step.theta, dense_step(J, v, step.mu, beta)) <= 1e-10
    assert abs(step.theta @ step.theta / EPS - 1) <= 1e-6
    assert step.norm2 == pytest.approx(EPS, rel=1e-6)
    assert step.quad == pytest.approx(np.sum((J @ step.theta) ** 2),
                                      rel=1e-10)


def test_exact_step_inside_the_ball_has_mu_zero():
    rng = np.random.default_rng(3)
    J = rng.normal(size=(50, 10))                 # full column rank
    v = unit(rng.normal(size=10))
    step = exact_step(J, v, 0.1, EPS)
    assert step.mu == 0
    assert rel(step.theta, dense_step(J, v, 0.0, 0.1)) <= 1e-10
    assert step.norm2 < EPS
    big = exact_step(J, v, 1e4, EPS)              # now the ball binds
    assert big.mu > 0 and abs(big.norm2 / EPS - 1) <= 1e-6
    assert rel(big.theta, dense_step(J, v, big.mu, 1e4)) <= 1e-10


def test_solve_mu_meets_the_norm_constraint():
    rng = np.random.default_rng(4)
    lam = np.concatenate([rng.exponential(size=30) * 10, [0.0]])
    weight = rng.uniform(size=31)
    for eps in (1e-4, 1e-2, 1.0):
        mu = solve_mu(lam, weight, 0.25, eps)
        norm2 = 0.25 * np.sum(weight / (lam + mu) ** 2)
        assert abs(norm2 / eps - 1) <= 1e-6


@pytest.mark.parametrize('accumulate,tol', [('dense', 1e-10),
                                            ('kernel', 1e-5)])
def test_block_step_equals_exact_with_a_single_block(accumulate, tol):
    model = OneLayer()
    layout = layout_of(model)
    assert len(layout.block_paths) == 1
    J = jacobian_rows(model, inputs(2))
    v = unit(np.random.default_rng(5).normal(size=J.shape[1]))
    solver = BlockSolver(layout, 'per_layer', None, accumulate)
    assert len(solver.blocks) == 1
    block, exact = solver(J, v, 1.0, EPS), exact_step(J, v, 1.0, EPS)
    assert rel(block.theta, exact.theta) <= tol
    assert block.mu == pytest.approx(exact.mu, rel=tol)
    assert abs(block.norm2 / EPS - 1) <= 1e-6


def test_block_step_per_unit_solves_its_own_block_problem():
    model = Tiny()
    layout = layout_of(model)
    J = jacobian_rows(model, inputs(3))
    v = unit(np.random.default_rng(6).normal(size=J.shape[1]))
    solver = BlockSolver(layout, 'per_unit', None, 'dense')
    step = solver(J, v, 1.0, EPS)
    G = np.zeros((J.shape[1],) * 2)                # the block-diagonal oracle
    for start, size in zip(solver.blocks.starts, solver.blocks.sizes):
        part = slice(start, start + size)
        G[part, part] = J[:, part].T @ J[:, part]
    oracle = np.linalg.solve(G + step.mu * np.eye(len(v)), v) / 2
    assert rel(step.theta, oracle) <= 1e-10
    assert abs(step.norm2 / EPS - 1) <= 1e-6


def test_step_moves_toward_target_keeping_outputs_better_than_straight():
    model = Tiny()
    layout = layout_of(model)
    target = MagnitudeTarget(layout, 0.5)
    w = get_weights(model, layout)
    v, distance = target.direction(w)
    J = jacobian_rows(model, inputs(3))
    step = exact_step(J, v, 1.0, EPS)
    straight = np.sqrt(EPS) * v                     # same length, toward P
    assert step.norm2 == pytest.approx(straight @ straight, rel=1e-6)
    assert step.quad < np.sum((J @ straight) ** 2)
    assert step.gain > 0
    assert target.distance(w + step.theta) < distance


@pytest.mark.parametrize('beta', [0.1, 1.0])
def test_anchored_step_equals_dense_solve_of_the_anchored_qp(beta):
    model = Tiny()
    J = jacobian_rows(model, inputs(3))
    rng = np.random.default_rng(8)
    v = unit(rng.normal(size=J.shape[1]))
    drift = rng.normal(size=J.shape[0]) * 0.1
    step = exact_step(J, anchored_direction(J, v, drift, beta), beta, EPS)
    n = J.shape[1]                   # KKT: (g + mu I) theta = b v/2 - J^T r
    oracle = np.linalg.solve(J.T @ J + step.mu * np.eye(n),
                             beta / 2 * v - J.T @ drift)
    assert rel(step.theta, oracle) <= 1e-10
    assert abs(step.norm2 / EPS - 1) <= 1e-6

    def anchored(theta):                 # the anchored QP's objective
        return np.sum((J @ theta + drift) ** 2) - beta * theta @ v
    plain = exact_step(J, v, beta, EPS)  # also on the sphere, not optimal
    assert anchored(step.theta) < anchored(plain.theta)


def test_anchored_direction_refuses_a_bad_drift():
    J = np.ones((4, 6))
    with pytest.raises(GradnetError, match='one entry per row'):
        anchored_direction(J, np.ones(6), np.ones(3), 1.0)
    with pytest.raises(GradnetError, match='drift has non-finite'):
        anchored_direction(J, np.ones(6), np.array([0, np.nan, 0, 0]), 1.0)


# ---------------------------------------------------------------- targets

def test_weight_vector_round_trips_through_the_model():
    model = Tiny()
    layout = layout_of(model, include_bias=True)
    w = get_weights(model, layout)
    assert w.shape == (layout.n_params,) == (12 * 8 + 8 + 8 * 3 + 3,)
    set_weights(model, layout, w * 2)
    assert np.array_equal(model.l1.W.array.ravel(), w[:96] * 2)
    assert np.array_equal(model.l1.b.array, w[96:104] * 2)


@pytest.mark.parametrize('scope', ['layer', 'global'])
def test_magnitude_projection_zeroes_the_smallest(scope):
    model = Tiny()
    layout = layout_of(model)
    w = get_weights(model, layout)
    projected = MagnitudeTarget(layout, 0.7, scope).project(w)
    parts = ([slice(0, 96), slice(96, 120)] if scope == 'layer'
             else [slice(0, 120)])
    for part in parts:
        original, kept = w[part], projected[part]
        k = int(round(0.7 * original.size))
        order = np.argsort(np.abs(original))
        assert (kept[order[:k]] == 0).all()
        assert np.array_equal(kept[order[k:]], original[order[k:]])


def test_structured_projection_removes_weakest_units_with_bias():
    model = Tiny()
    layout = layout_of(model, include_bias=True)
    w = get_weights(model, layout)
    projected = StructuredTarget(layout, 'l1', 3).project(w)
    W, b = projected[:96].reshape(8, 12), projected[96:104]
    norms = np.linalg.norm(model.l1.W.array, axis=1)
    removed = np.argsort(norms)[:3]
    assert (W[removed] == 0).all() and (b[removed] == 0).all()
    kept = np.setdiff1d(np.arange(8), removed)
    assert np.array_equal(W[kept], model.l1.W.array[kept])


@pytest.mark.parametrize('value', [0, 1, 1.5, -0.2, 'x'])
def test_sparsity_outside_the_open_interval_is_refused(value):
    with pytest.raises(GradnetError, match='sparsity'):
        MagnitudeTarget(layout_of(Tiny()), value)


def test_bad_structured_target_is_refused():
    layout = layout_of(Tiny())
    with pytest.raises(GradnetError, match='units'):
        StructuredTarget(layout, 'l1', 8)
    with pytest.raises(GradnetError, match='no weights'):
        StructuredTarget(layout, 'nope', 1)


def test_different_architectures_are_refused():
    same_architecture(layout_of(Tiny()), layout_of(Tiny(seed=3)))
    with pytest.raises(GradnetError, match='architecture'):
        same_architecture(layout_of(Tiny()), layout_of(OneLayer()))


# ------------------------------------------------------------------- walk

SETTINGS = WalkSettings(max_steps=4, batch=3, eval_every=1,
                        checkpoint_every=1, threshold=0.01)


def accuracy_of(x, y):
    def evaluate(model):
        with chainer.no_backprop_mode():
            return {'acc': float((model(x).array.argmax(1) == y).mean())}
    return evaluate


@pytest.mark.parametrize('method', ['geodesic', 'fip'])
def test_walk_reduces_the_distance_and_ends_sparse(method):
    model = Tiny()
    layout = layout_of(model)
    target = MagnitudeTarget(layout, 0.5)
    x = inputs(20)
    y = np.zeros(20, dtype=np.int32)
    result = walk(model, layout, target, x,
                  WalkSettings(**{**SETTINGS.__dict__, 'method': method}),
                  evaluate=accuracy_of(x, y), score=lambda e: e['acc'])
    distances = [e['distance'] for e in result.history[:-1]]
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert result.history[-1]['projected'] and 'acc' in result.history[-1]
    w = get_weights(model, layout)
    assert np.array_equal(w, result.w)
    assert target.distance(w) == 0
    assert result.steps == 4 and result.passes == pytest.approx(12 / 20)


def test_anchored_walk_keeps_the_starting_outputs_closer():
    x = inputs(20)
    layout = layout_of(Tiny())
    start = Tiny()
    with chainer.no_backprop_mode():
        z0 = start(x).array
    drifts = {}
    for anchor in (0.0, 1.0):
        model = Tiny()
        settings = WalkSettings(**{**SETTINGS.__dict__, 'max_steps': 12,
                                   'batch': 10, 'beta': 0.1,
                                   'anchor': anchor, 'project_at_end': False})
        result = walk(model, layout, MagnitudeTarget(layout, 0.5), x,
                      settings)
        assert result.steps == 12
        assert ('drift' in result.history[-1]) == (anchor > 0)
        with chainer.no_backprop_mode():
            drifts[anchor] = float(np.mean((model(x).array - z0) ** 2))
    assert drifts[1.0] < 0.5 * drifts[0.0]


@pytest.mark.parametrize('change,message', [
    ({'anchor': -1.0}, 'anchor must be >= 0'),
    ({'anchor': 1.0, 'method': 'fip'}, 'geodesic method only'),
    ({'anchor': 1.0, 'solver': 'block'}, 'needs the exact solver')])
def test_walk_settings_refuse_a_bad_anchor(change, message):
    with pytest.raises(GradnetError, match=message):
        WalkSettings(**{**SETTINGS.__dict__, **change}).check()


def test_walk_resumes_from_its_checkpoint(tmp_path):
    layout = layout_of(Tiny())
    x = inputs(20)
    whole = walk(Tiny(), layout, MagnitudeTarget(layout, 0.5), x, SETTINGS)
    path = str(tmp_path / 'walk.npz')
    first = WalkSettings(**{**SETTINGS.__dict__, 'max_steps': 2,
                            'project_at_end': False})
    walk(Tiny(), layout, MagnitudeTarget(layout, 0.5), x, first,
         checkpoint=path)
    with pytest.raises(GradnetError, match='another walk'):
        walk(Tiny(), layout, MagnitudeTarget(layout, 0.5), x,
             WalkSettings(**{**first.__dict__, 'beta': 2.0}),
             checkpoint=path)
    resumed = walk(Tiny(), layout, MagnitudeTarget(layout, 0.5), x,
                   WalkSettings(**{**first.__dict__, 'max_steps': 4,
                                   'project_at_end': True}),
                   checkpoint=path)
    assert resumed.steps == 4
    np.testing.assert_allclose(resumed.w, whole.w, rtol=0, atol=1e-12)
    assert [e['step'] for e in resumed.history] == [0, 1, 2, 3, 4, 4]


def test_walk_refuses_a_target_already_reached():
    model = Tiny()
    layout = layout_of(model)
    target = MagnitudeTarget(layout, 0.5)
    set_weights(model, layout, target.project(get_weights(model, layout)))
    with pytest.raises(GradnetError, match='already'):
        walk(model, layout, target, inputs(5), SETTINGS)


@pytest.mark.filterwarnings('ignore::RuntimeWarning')
def test_walk_refuses_a_non_finite_jacobian():
    layout = layout_of(Tiny())
    target = WeightsTarget(get_weights(Tiny(seed=1), layout))
    x = inputs(5)
    x[2, 0, 1, 1] = np.inf
    with pytest.raises(GradnetError, match='Jacobian has non-finite'):
        walk(Tiny(), layout, target, x, SETTINGS)
    model = Tiny()
    model.l1.W.array[0, 0] = np.nan
    with pytest.raises(GradnetError, match='not finite'):
        walk(model, layout, target, inputs(5), SETTINGS)


def test_walk_to_another_network_arrives_there():
    layout = layout_of(Tiny())
    w2 = get_weights(Tiny(seed=1), layout)
    model = Tiny()
    result = walk(model, layout, WeightsTarget(w2), inputs(10),
                  WalkSettings(max_steps=500, batch=3, eps=1.0,
                               eval_every=0))
    assert result.reached and result.history[-2]['distance'] <= 0.01
    assert np.array_equal(get_weights(model, layout), w2)


# -------------------------------------------------------------- baselines

def test_one_shot_and_prune_finetune_reach_the_sparsity():
    x = inputs(30, np.float32)
    y = (np.arange(30) % 3).astype(np.int32)
    model = Tiny(np.float32)
    layout = layout_of(model)
    target = MagnitudeTarget(layout, 0.6)
    entry, = one_shot(model, layout, target)
    assert entry['sparsity'] == pytest.approx(0.6, abs=0.01)
    model = Tiny(np.float32)
    history = prune_finetune(model, layout, target, x, y, passes=2,
                             rounds=2, evaluate=accuracy_of(x, y), batch=5)
    assert [e['round'] for e in history] == [1, 1, 2, 2]
    assert history[-1]['passes'] == pytest.approx(2.0)
    assert history[1]['sparsity'] >= 0.3 - 0.01
    assert history[-1]['sparsity'] >= 0.6 - 0.01


def test_interpolate_ends_at_the_second_network():
    layout = layout_of(Tiny())
    w1, w2 = get_weights(Tiny(), layout), get_weights(Tiny(seed=1), layout)
    model = Tiny()
    history = interpolate(model, layout, w1, w2, 3)
    assert [e['t'] for e in history] == [0.0, 0.5, 1.0]
    assert history[-1]['distance'] == 0
    assert np.array_equal(get_weights(model, layout), w2)
