"""The PyTorch tangent source on a CUDA device: a module on the GPU takes
CuPy input (DLPack, no copy) and returns CuPy rows, equal to per-sample
autograd on the CPU (tests/test_torch_source.py's oracle); ``extract
--framework torch --device gpu`` writes the store the NumPy reference
sparsifier makes of those rows. Skipped without a CUDA device
(tests/gpu/conftest.py) or where torch sees none."""
import pytest

torch = pytest.importorskip('torch')

from gradnet_cupy.backend import import_cupy  # noqa: E402
from test_torch_source import (  # noqa: E402
    ROW_CASES, assert_cli_round_trip, assert_rows_equal_per_sample_autograd,
    model_files)

cupy = import_cupy()
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='torch sees no CUDA device')
__all__ = ['model_files']  # the fixture, imported for the CLI test


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    """Bit-stable convolution gradients, so that a row computed twice on
    the GPU has the same percentile threshold both times."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize('build, dtype, include_bias', ROW_CASES)
def test_cuda_rows_equal_cpu_per_sample_autograd(build, dtype, include_bias):
    assert_rows_equal_per_sample_autograd(build, dtype, include_bias, cupy)


def test_cli_gpu_extraction_is_the_reference_sparsifier_of_cuda_rows(
        model_files, tmp_path):
    assert_cli_round_trip(model_files, tmp_path, cupy)
