"""The RBM (gradnet_cupy.rbm) and the engine's unsupervised objective,
against independent oracles: Chainer autograd one sample at a time, a
hand-written NumPy CD-1 step, and the exactly enumerated model expectation.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.cli import main
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet import GradNet, predict_from_candidates
from gradnet_cupy.kernels import CSR
from gradnet_cupy.models import build_model
from gradnet_cupy.rbm import (
    FREE_ENERGY, RBM, DiagonalFisher, binarize, cd_step, check_objective_for,
    draw_uniforms, exact_expectation, fisher_scores, free_energy_gradients,
    model_expectation, rbm_layout, train_rbm)
from gradnet_cupy.tangent import CROSS_ENTROPY, tangent_features


def tiny_rbm(n_visible=6, n_hidden=4, seed=1, dtype=np.float64):
    """An RBM with random (not tiny) weights and biases."""
    rbm = RBM(n_visible, n_hidden, dtype=dtype)
    rng = np.random.RandomState(seed)
    rbm.hidden.W.array[...] = rng.standard_normal((n_hidden, n_visible))
    rbm.hidden.b.array[...] = 0.5 * rng.standard_normal(n_hidden)
    rbm.visible.W.array[...] = 0.5 * rng.standard_normal((1, n_visible))
    return rbm


def binary(n, v, seed=0):
    return (np.random.RandomState(seed).uniform(size=(n, v)) < 0.5).astype(
        np.float64)


def autograd_row(rbm, v, params):
    """grad F(v) of one sample by Chainer's autograd."""
    rbm.cleargrads()
    with chainer.using_config('train', False):
        f = rbm(v[None])
    f.grad = np.ones_like(f.array)
    f.backward()
    return np.concatenate([p.grad.ravel() for p in params])


@pytest.mark.parametrize('max_bytes', [None, 2000])
@pytest.mark.parametrize('biases', [(True, True), (False, True),
                                    (True, False)])
def test_free_energy_gradient_matches_autograd(max_bytes, biases):
    rbm = tiny_rbm(9, 5)
    visible_bias, hidden_bias = biases
    layout = rbm_layout(rbm, visible_bias, hidden_bias)
    v = binary(7, 9)
    got = free_energy_gradients(rbm, v, layout, max_bytes=max_bytes,
                                n_threads=2)
    params = [rbm.hidden.W] + ([rbm.hidden.b] if hidden_bias else []) + \
        ([rbm.visible.W] if visible_bias else [])
    assert got.shape == (7, layout.n_params) and got.dtype == np.float64
    for i in range(7):
        want = autograd_row(rbm, v[i], params)
        assert np.abs(got[i] - want).max() <= 1e-10 * np.abs(want).max()
    # and the closed form: dF/dW = -sigmoid(Wv + c) v', dF/dc = -sigmoid,
    # dF/db = -v
    p = 1 / (1 + np.exp(-(v @ rbm.W.T + rbm.c)))
    closed = [-(p[:, :, None] * v[:, None, :]).reshape(7, -1)]
    closed += [-p] if hidden_bias else []
    closed += [-v] if visible_bias else []
    np.testing.assert_allclose(got, np.concatenate(closed, axis=1),
                               rtol=1e-12, atol=1e-14)


def test_unsupervised_rows_have_no_candidate():
    rbm = tiny_rbm()
    batch = tangent_features(rbm, binary(5, 6), np.arange(5),
                             candidates='all', objective=FREE_ENERGY,
                             layout=rbm_layout(rbm))
    assert batch.features.shape == (5, rbm_layout(rbm).n_params)
    assert batch.candidate.tolist() == [-1] * 5
    assert batch.sample.tolist() == list(range(5))
    assert batch.target.tolist() == list(range(5))


def numpy_cd1(W, b, c, v0, u_h, u_v, lr):
    """A hand-written CD-1 step with plain SGD."""
    def sig(a):
        return 1 / (1 + np.exp(-a))
    ph0 = sig(v0 @ W.T + c)
    h = (u_h < ph0).astype(v0.dtype)
    v1 = (u_v < sig(h @ W + b)).astype(v0.dtype)
    ph1 = sig(v1 @ W.T + c)
    n = len(v0)
    return (W + lr * ((ph0.T @ v0 - ph1.T @ v1) / n),
            b + lr * (v0 - v1).mean(axis=0),
            c + lr * (ph0 - ph1).mean(axis=0))


def test_cd1_matches_numpy_step_exactly():
    rbm = tiny_rbm(6, 4)
    W, b, c = rbm.W.copy(), rbm.b.copy(), rbm.c.copy()
    v0 = binary(10, 6, seed=3)
    uniforms = draw_uniforms(np.random.RandomState(7), 1, 10, 6, 4,
                             np.float64)
    optimizer = chainer.optimizers.SGD(lr=0.1)
    optimizer.setup(rbm)
    cd_step(rbm, optimizer, v0, uniforms)
    W1, b1, c1 = numpy_cd1(W, b, c, v0, uniforms[0][0], uniforms[1][0], 0.1)
    np.testing.assert_array_equal(rbm.W, W1)
    np.testing.assert_array_equal(rbm.b, b1)
    np.testing.assert_array_equal(rbm.c, c1)


def test_gibbs_expectation_agrees_with_enumeration():
    rbm = tiny_rbm(6, 4, seed=2)
    exact = exact_expectation(rbm)
    mean, stderr = model_expectation(rbm, seed=5, n_chains=200,
                                     burn_in=200, samples_per_chain=20,
                                     thin=5)
    z = np.abs(mean - exact) / stderr
    assert z.max() < 5, z.max()
    assert np.mean(z < 2) > 0.8    # about 95 % within 2 sigma


def test_training_lowers_free_energy_of_data_cpu_chains():
    rng = np.random.RandomState(0)
    protos = (rng.uniform(size=(2, 12)) < 0.5).astype(np.float32)
    v = protos[rng.randint(0, 2, 200)]
    rbm = RBM(12, 6, seed=1)
    before = rbm.free_energy(v).mean() - rbm.free_energy(1 - v).mean()
    history = train_rbm(rbm, v, epochs=5, batch=10, lr=0.1, k=2,
                        persistent=True, seed=0)
    after = rbm.free_energy(v).mean() - rbm.free_energy(1 - v).mean()
    assert len(history) == 5 and after < before - 1


def test_fisher_scores_centre_and_diagonal_scaling():
    rbm = tiny_rbm()
    v = binary(50, 6)
    centre = exact_expectation(rbm)
    scores = fisher_scores(rbm, v, centre)
    np.testing.assert_allclose(scores, centre - free_energy_gradients(rbm, v),
                               rtol=0, atol=0)
    scaled = DiagonalFisher.fit(scores, damping=0).apply(scores)
    np.testing.assert_allclose((scaled ** 2).mean(axis=0), 1, rtol=1e-10)


def test_linear_head_is_logistic_regression():
    rng = np.random.RandomState(0)
    dense = rng.standard_normal((6, 5)).astype(np.float32)
    dense[dense < 0] = 0
    import scipy.sparse as sp
    m = sp.csr_matrix(dense)
    csr = CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data,
              m.shape)
    net = GradNet([2, 3], [0], 4)
    net.W.array[...] = rng.standard_normal(net.W.shape)
    net.b.array[...] = rng.standard_normal(4)
    np.testing.assert_allclose(net(csr).array,
                               dense @ net.W.array + net.b.array, rtol=1e-5)
    # one row per sample (candidate -1): prediction is the row's argmax
    ids, predicted = predict_from_candidates(net(csr).array, np.arange(6))
    assert predicted.tolist() == net(csr).array.argmax(axis=1).tolist()


def test_bad_input_one_line_errors():
    with pytest.raises(GradnetError, match='at least one visible and one '
                       'hidden'):
        RBM(6, 0)
    with pytest.raises(GradnetError, match='binary'):
        binarize(np.full((2, 3), 0.5, np.float32))
    with pytest.raises(GradnetError, match='binary'):
        train_rbm(RBM(3, 2), np.full((4, 3), 0.5, np.float32))
    classifier = build_model('mlp', (1, 4, 4), 3)
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(GradnetError, match='one scalar per sample'):
        tangent_features(classifier, x, objective=FREE_ENERGY)
    with pytest.raises(GradnetError, match='needs an RBM'):
        check_objective_for(classifier, FREE_ENERGY)
    rbm = tiny_rbm()
    with pytest.raises(GradnetError, match='logits of shape'):
        tangent_features(rbm, binary(2, 6), candidates='all',
                         objective=CROSS_ENTROPY)
    with pytest.raises(GradnetError, match='no labels'):
        check_objective_for(rbm, CROSS_ENTROPY)


def test_cli_train_extract_fit_linear(tmp_path):
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, [*args, '--device', 'cpu', '--json'])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])

    run('train-rbm', '--hidden', '3', '--binarize', '0.5', '--epochs', '1',
        '--subset', '40', '--out', str(tmp_path / 'rbm'))
    snapshot = str(tmp_path / 'rbm' / 'rbm.npz')
    for split in ('gradnet', 'test'):
        summary = run('extract', '--arch', 'rbm', '--objective',
                      'free-energy', '--binarize', '0.5', '--model', snapshot,
                      '--subset', '40', '--split', split, '--out',
                      str(tmp_path / f'{split}.h5'))
        assert summary['rows'] == 40
        assert summary['n_columns'] == 784 * 3 + 3 + 784
    fit = run('fit', '--train', str(tmp_path / 'gradnet.h5'), '--test',
              str(tmp_path / 'test.h5'), '--hidden', '0', '--epochs', '1',
              '--out', str(tmp_path / 'fit'))
    assert fit['hidden_sizes'] == [0] and 0 <= fit['test_accuracy'] <= 1
    bad = runner.invoke(main, ['extract', '--arch', 'rbm', '--model',
                               snapshot, '--subset', '5', '--binarize', '0.5',
                               '--out', str(tmp_path / 'x.h5'), '--device',
                               'cpu'])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1].startswith('error: ')


def test_cli_extract_diagonal_fisher_scaling(tmp_path):
    """``extract --arch rbm --fisher-scaling diagonal``: the stored rows of
    both splits equal a NumPy oracle: closed-form ``grad F`` (W: -sigma(c +
    Wv) v', c: -sigma(c + Wv), b: -v), centred, each coordinate divided by
    ``sqrt(E_gradnet[s_j^2] + 1e-3 mean_j E_gradnet[s_j^2])`` over the
    *gradnet* split's scores, then per layer block kept where ``|y| >
    percentile(|y|, q)``; a test store without the scaling is refused by
    fit, and the option on a classifier is one error line."""
    from gradnet_cupy.data import load_dataset
    from gradnet_cupy.rbm import load_rbm
    from gradnet_cupy.store import TangentStore
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [*map(str, args), '--device', 'cpu',
                                    '--json'])

    assert invoke('train-rbm', '--hidden', '3', '--binarize', '0.5',
                  '--epochs', '1', '--subset', '30', '--out',
                  tmp_path / 'rbm').exit_code == 0
    snapshot = tmp_path / 'rbm' / 'rbm.npz'
    extract = ('extract', '--arch', 'rbm', '--objective', 'free-energy',
               '--binarize', '0.5', '--model', snapshot, '--subset', '30',
               '--q', '80')
    for split in ('gradnet', 'test'):
        result = invoke(*extract, '--split', split, '--fisher-scaling',
                        'diagonal', '--out', tmp_path / f'{split}.h5')
        assert result.exit_code == 0, result.output
    rbm = load_rbm(str(snapshot))
    W, c = rbm.hidden.W.array.astype(np.float64), \
        rbm.hidden.b.array.astype(np.float64)
    centre = model_expectation(rbm, rbm_layout(rbm), seed=0)[0]
    data = load_dataset('mnist', subset=30)

    def scores(split):
        v = (getattr(data, split)[0].reshape(30, -1) > 0.5).astype(np.float64)
        p = 1 / (1 + np.exp(-(v @ W.T + c)))
        grad = np.hstack([-(p[:, :, None] * v[:, None, :]).reshape(30, -1),
                          -p, -v])
        return centre - grad

    second = (scores('gradnet') ** 2).mean(axis=0)
    scale = 1 / np.sqrt(second + 1e-3 * second.mean())
    for split in ('gradnet', 'test'):
        y = scores(split) * scale
        want, boundary = np.zeros_like(y), np.zeros(y.shape, bool)
        for row in range(30):
            for part in (slice(0, 784 * 3 + 3), slice(784 * 3 + 3, None)):
                block = y[row, part]
                cut = np.percentile(np.abs(block), 80)
                want[row, part] = np.where(np.abs(block) > cut, block, 0)
                # float32 vs float64: entries within 1e-5 of the cut may
                # fall on either side of it
                boundary[row, part] = np.isclose(np.abs(block), cut,
                                                 rtol=1e-5)
        with TangentStore.open(tmp_path / f'{split}.h5') as store:
            assert store.provenance['fisher_scaling'] == 'diagonal'
            got = np.vstack([b.csr.to_scipy().toarray()
                             for b in store.iter_batches(64)])
        assert boundary.sum() < 0.001 * boundary.size
        np.testing.assert_allclose(got[~boundary], want[~boundary],
                                   rtol=1e-4, atol=1e-6)
    assert invoke(*extract, '--split', 'test', '--out',
                  tmp_path / 'plain.h5').exit_code == 0
    refused = invoke('fit', '--train', tmp_path / 'gradnet.h5', '--test',
                     tmp_path / 'plain.h5', '--hidden', '0', '--out',
                     tmp_path / 'fit')
    assert refused.exit_code == 1 and 'fisher_scaling' in refused.output
    classifier = invoke('extract', '--arch', 'mlp', '--model', snapshot,
                        '--fisher-scaling', 'diagonal', '--subset', '5',
                        '--out', tmp_path / 'x.h5')
    line, = classifier.output.strip().splitlines()[-1:]
    assert classifier.exit_code == 1 and line.startswith('error: ') \
        and '--fisher-scaling' in line
