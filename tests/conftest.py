"""Fixtures shared by the whole suite: ``rng``, and ``backend``, the tier a
kernel test runs on (kernel_backends.py)."""
import numpy as np
import pytest

from kernel_backends import BACKENDS, make_backend


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'backends(*names): run a kernel test on these tiers only '
        f'(of {", ".join(BACKENDS)})')


def pytest_generate_tests(metafunc):
    """Every test that takes ``backend`` runs on each tier of BACKENDS (or
    of its ``backends`` mark), unless it parametrizes ``backend`` itself
    (kernel_backends.per_tier)."""
    if 'backend' not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers('parametrize'):
        names = mark.args[0]
        if isinstance(names, str):
            names = [name.strip() for name in names.split(',')]
        if 'backend' in names:
            return
    mark = metafunc.definition.get_closest_marker('backends')
    tiers = mark.args if mark else BACKENDS
    assert set(tiers) <= set(BACKENDS), tiers
    metafunc.parametrize('backend', tiers, indirect=True)


@pytest.fixture
def backend(request):
    return make_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
