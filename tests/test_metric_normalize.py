"""The ``metric`` normalization (MetricNormalizer) against a dense NumPy
oracle, and its save/load round trip beside a GradNet."""
import os

import numpy as np
import pytest
import scipy.linalg

from block_outer_cases import csr_from_dense, random_csr
from sparsify_cases import kept_oracle
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet import (GradNet, candidate_outputs, load_gradnet,
                                  save_gradnet)
from gradnet_cupy.normalize import MetricNormalizer, TrainingFeatures
from gradnet_cupy.options import MetricOptions, NormalizeOptions
from gradnet_cupy.tangent import ParameterLayout

# a conv (4 filters of 3 x 2 x 2) with its bias, then a Linear (5 x 8) with
# its bias: two layer blocks of 52 and 45 columns
LAYOUT = ParameterLayout.from_dict({'entries': [
    {'path': '/conv', 'name': 'W', 'shape': [4, 3, 2, 2], 'offset': 0,
     'size': 48, 'link_type': 'Convolution2D'},
    {'path': '/conv', 'name': 'b', 'shape': [4], 'offset': 48, 'size': 4,
     'link_type': 'Convolution2D'},
    {'path': '/fc', 'name': 'W', 'shape': [5, 8], 'offset': 52, 'size': 40,
     'link_type': 'Linear'},
    {'path': '/fc', 'name': 'b', 'shape': [5], 'offset': 92, 'size': 5,
     'link_type': 'Linear'}]})
N = 97
SEGMENTS = [52, 45]
# per_unit with max_block 5, written out by hand: each 12-tap filter in
# three pieces of 4, the conv bias, each 8-input unit in two pieces of 4,
# the fc bias
ORACLE_BLOCKS = ([(4 * i, 4) for i in range(12)] + [(48, 4)]
                 + [(52 + 4 * i, 4) for i in range(10)] + [(92, 5)])
Q = 60.0
DAMPING = 1e-2


def oracle_normalize(train, rows):
    """Dense float64 oracle: per block ``(G_b + lambda_b I)^{-1/2} t_b`` with
    ``G_b`` the mean of ``t_b t_b^T`` over the training rows and ``lambda_b
    = DAMPING * trace(G_b) / size`` (1 for an untouched block), then per row
    and layer segment keep ``|y| > percentile(|y|, Q)``."""
    y = rows.copy()
    for start, size in ORACLE_BLOCKS:
        part = slice(start, start + size)
        G = train[:, part].T @ train[:, part] / len(train)
        trace = np.trace(G) / size
        lam = DAMPING * trace if trace > 0 else 1.0
        root = scipy.linalg.fractional_matrix_power(
            G + lam * np.eye(size), -0.5).real
        y[:, part] = rows[:, part] @ root
    return kept_oracle(y, Q, SEGMENTS)


def training_rows(rng):
    """Training rows in two batches; the fc bias block is never touched."""
    csr, dense = random_csr(rng, 40, N, 0.5)
    dense[:, 92:] = 0
    return dense, [csr_from_dense(dense[:25]), csr_from_dense(dense[25:])]


def fitted(rng):
    train, batches = training_rows(rng)
    normalizer = MetricNormalizer.fit(
        TrainingFeatures(LAYOUT, Q, lambda: iter(batches)),
        NormalizeOptions('metric', metric=MetricOptions(
            partition='per_unit', max_block=5, damping=DAMPING)))
    return train, normalizer


def test_metric_normalizer_matches_dense_oracle(rng):
    train, normalizer = fitted(rng)
    csr, rows = random_csr(rng, 12, N, 0.3, empty_rows=[4])
    out = normalizer(csr)
    expected = oracle_normalize(train, rows)
    got = out.to_scipy().toarray()
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)
    # the percentile rule kept a minority of each touched row's entries
    assert 0 < out.nnz < 0.5 * N * 11 and out.indptr[5] == out.indptr[4]


def test_metric_normalizer_refuses_missing_q_and_memory(rng):
    _, batches = training_rows(rng)
    with pytest.raises(GradnetError, match='percentile q'):
        MetricNormalizer.fit(TrainingFeatures(LAYOUT, None,
                                              lambda: iter(batches)),
                             NormalizeOptions('metric'))
    with pytest.raises(GradnetError, match='needs .* max_bytes'):
        MetricNormalizer.fit(
            TrainingFeatures(LAYOUT, Q, lambda: iter(batches)),
            NormalizeOptions('metric', metric=MetricOptions(
                'per_layer', max_block=0, max_bytes=1000)))


def test_metric_normalizer_round_trips_with_gradnet(rng, tmp_path):
    _, normalizer = fitted(rng)
    model = GradNet(SEGMENTS, [3, 2], 4, seed=1)
    save_gradnet(str(tmp_path), model, normalizer)
    assert os.path.exists(tmp_path / 'metric.h5')
    loaded_model, loaded, _ = load_gradnet(str(tmp_path))
    assert isinstance(loaded, MetricNormalizer) and loaded.q == Q
    csr, _ = random_csr(rng, 9, N, 0.3)
    before, after = normalizer(csr), loaded(csr)
    for a, b in zip(before[:3], after[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(candidate_outputs(model, before),
                                  candidate_outputs(loaded_model, after))
