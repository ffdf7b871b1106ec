import numpy as np
import pytest
import scipy.sparse

from gradnet_cupy.chainer_compat import F
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet import (
    GradNet, column_ranges, predict_from_candidates,
    proportional_hidden_sizes)
from gradnet_cupy.kernels import CSR


def random_csr(rng, rows, cols, density=0.2, dtype=np.float32):
    m = scipy.sparse.random(rows, cols, density=density, format='csr',
                            random_state=np.random.RandomState(
                                rng.integers(1 << 30)), dtype=dtype)
    m.data = (m.data - 0.5).astype(dtype)
    m.sort_indices()
    return CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
               m.data, m.shape), m.toarray()


def dense_gradnet(model, x):
    """The same network on a dense input, written independently: the block
    wiring as a mask on one dense first-layer weight matrix."""
    n_hidden = sum(model.hidden_sizes)
    W = np.zeros((n_hidden, model.n_columns), dtype=x.dtype)
    b = np.zeros(n_hidden, dtype=x.dtype)
    row = 0
    for k, (start, stop) in enumerate(model.ranges):
        h = model.hidden_sizes[k]
        W[row:row + h, start:stop] = getattr(model, f'W{k}').array.T
        b[row:row + h] = getattr(model, f'b{k}').array
        row += h
    hidden = np.maximum(x @ W.T + b, 0)
    return hidden @ model.out.W.array.T + model.out.b.array


@pytest.mark.parametrize('wiring', ['diagonal', 'adjacent'])
def test_forward_equals_dense_computation(rng, wiring):
    csr, dense = random_csr(rng, 7, 30)
    model = GradNet([5, 15, 10], [2, 4, 3], 4, wiring=wiring)
    got = model(csr).array
    np.testing.assert_allclose(got, dense_gradnet(model, dense),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('wiring', ['diagonal', 'adjacent'])
def test_first_layer_gradient_matches_dense_autograd(rng, wiring):
    """The sparse layer's weight gradient equals Chainer's own gradient of
    the same loss computed with a dense input and dense matmul."""
    csr, dense = random_csr(rng, 9, 40, dtype=np.float64)
    model = GradNet([10, 20, 10], [3, 2, 4], 3, wiring=wiring)
    model.to_device('@numpy')
    for p in model.params():
        p.array = p.array.astype(np.float64)
    t = rng.integers(0, 3, size=9).astype(np.int32)
    model.cleargrads()
    F.softmax_cross_entropy(model(csr), t).backward()
    sparse_grads = [getattr(model, f'W{k}').grad.copy() for k in range(3)]

    model.cleargrads()
    parts = []
    for k, (start, stop) in enumerate(model.ranges):
        pre = F.bias(F.matmul(dense[:, start:stop], getattr(model, f'W{k}')),
                     getattr(model, f'b{k}'))
        parts.append(pre)
    logits = model.out(F.relu(F.concat(parts, axis=1)))
    F.softmax_cross_entropy(logits, t).backward()
    for k in range(3):
        np.testing.assert_allclose(sparse_grads[k],
                                   getattr(model, f'W{k}').grad, rtol=1e-10,
                                   atol=1e-12)


def test_first_layer_passes_numerical_gradient_check(rng):
    csr, _ = random_csr(rng, 5, 12, density=0.5, dtype=np.float64)
    W = rng.normal(size=(12, 3))
    gy = rng.normal(size=(5, 3))
    from gradnet_cupy.gradnet import sparse_matmul, to_sparse_matrix
    x = to_sparse_matrix(csr)
    from chainer import gradient_check
    gradient_check.check_backward(
        lambda w: sparse_matmul(x, w), W, gy, dtype=np.float64)


def test_block_wiring_column_ranges():
    assert column_ranges([4, 6, 3], 'diagonal') == [(0, 4), (4, 10), (10, 13)]
    assert column_ranges([4, 6, 3], 'adjacent') == [(0, 10), (4, 13), (10, 13)]
    with pytest.raises(GradnetError, match='wiring'):
        column_ranges([4], 'full')


def test_hidden_block_does_not_see_other_blocks(rng):
    """Changing columns outside a hidden block's range leaves it unchanged."""
    csr, dense = random_csr(rng, 4, 20, density=0.6)
    model = GradNet([8, 12], [3, 5], 2)
    h = model.hidden(csr).array
    changed = dense.copy()
    changed[:, 8:] += 1.0
    m = scipy.sparse.csr_matrix(changed)
    h2 = model.hidden(CSR(m.indptr.astype(np.int64),
                          m.indices.astype(np.int32),
                          m.data.astype(np.float32), m.shape)).array
    np.testing.assert_array_equal(h[:, :3], h2[:, :3])
    assert not np.allclose(h[:, 3:], h2[:, 3:])


def test_column_count_mismatch_is_refused(rng):
    csr, _ = random_csr(rng, 3, 10)
    with pytest.raises(GradnetError, match='11'):
        GradNet([5, 6], [2, 2], 2)(csr)


def test_proportional_hidden_sizes():
    sizes = proportional_hidden_sizes([4800, 102400, 23040], 130)
    assert sum(sizes) == 130 and min(sizes) >= 1
    assert sizes[1] > sizes[2] > sizes[0]
    assert proportional_hidden_sizes([1, 1000], 3) == [1, 2]


def test_prediction_sums_raw_outputs_over_candidates():
    # sample 7: candidate rows favour class 1 in sum though row 0 says 0
    outputs = np.array([[5.0, 0.0, 0.0],
                        [0.0, 3.0, 0.0],
                        [0.0, 3.0, 0.0],
                        [0.0, 0.0, 1.0],
                        [2.0, 0.0, 0.5]])
    sample = np.array([7, 7, 7, 2, 2])
    samples, predicted = predict_from_candidates(outputs, sample)
    assert samples.tolist() == [2, 7]
    assert predicted.tolist() == [0, 1]


def synthetic_candidates(rng, n_samples, n_classes=3, cols_per_block=(12, 20)):
    """A tiny problem in the tangent features' shape: one row per
    (sample, candidate); the true class shows as a sparse signature whose
    sign flips when the candidate is the true class, plus sparse noise."""
    n_cols = sum(cols_per_block)
    signatures = rng.normal(size=(n_classes, n_cols)) * (
        rng.random((n_classes, n_cols)) < 0.3)
    rows, sample, candidate, target = [], [], [], []
    labels = rng.integers(0, n_classes, size=n_samples)
    for i, y in enumerate(labels):
        for c in range(n_classes):
            noise = rng.normal(size=n_cols) * (rng.random(n_cols) < 0.2)
            sign = -1.0 if c == y else 1.0
            rows.append(sign * signatures[y] + noise)
            sample.append(i)
            candidate.append(c)
            target.append(y)
    m = scipy.sparse.csr_matrix(np.array(rows, dtype=np.float32))
    m.sort_indices()
    csr = CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
              m.data, m.shape)
    return csr, np.array(sample), np.array(candidate), np.array(
        target, dtype=np.int32)


def rows_of(csr, index):
    m = csr.to_scipy()[index]
    return CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
               m.data.astype(np.float32), m.shape)


def test_gradnet_learns_a_synthetic_problem(rng):
    from gradnet_cupy.gradnet import (evaluate_candidates, make_optimizer,
                                      train_step)
    features, sample, cand, target = synthetic_candidates(rng, 400)
    train_rows = np.flatnonzero(sample < 300)
    test_rows = np.flatnonzero(sample >= 300)
    train, train_cand, train_y = (rows_of(features, train_rows),
                                  cand[train_rows], target[train_rows])
    test, test_sample, test_y = (rows_of(features, test_rows),
                                 sample[test_rows], target[test_rows])
    model = GradNet([12, 20], [8, 8], 3)
    optimizer = make_optimizer(model, 'sgd', lr=0.05)
    # random candidate per sample, like the paper's training data
    pick = np.flatnonzero(train_cand == rng.integers(0, 3, size=train_cand.size))
    before, *_ = evaluate_candidates(model, [(test, test_sample, test_y)])
    for epoch in range(30):
        order = rng.permutation(pick)
        for start in range(0, order.size, 25):
            idx = order[start:start + 25]
            train_step(model, optimizer, rows_of(train, idx), train_y[idx])
    accuracy, samples, predicted, truth = evaluate_candidates(
        model, [(test, test_sample, test_y)])
    assert samples.tolist() == list(range(300, 400))
    # the rule written out here: a sample's 3 candidate rows are stored
    # together; sum their outputs, take the best class
    outputs = model(test).array     # no dropout or batchnorm here
    want = outputs.reshape(100, 3, -1).sum(axis=1).argmax(axis=1)
    np.testing.assert_array_equal(predicted, want)
    np.testing.assert_array_equal(truth, test_y[::3])
    assert accuracy == np.mean(want == test_y[::3])
    assert accuracy > 0.8, (before, accuracy)
