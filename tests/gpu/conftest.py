"""tests/gpu compares the CUDA kernels with their NumPy references on a real
device. Without a visible CUDA device every test here is skipped."""
import pytest

from gradnet_cupy.backend import gpu_available


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason='needs CuPy and a CUDA device')
    for item in items:
        if 'tests/gpu/' in str(item.fspath).replace('\\', '/'):
            item.add_marker(skip)
