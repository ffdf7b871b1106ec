"""The PyTorch tangent source on a CUDA device: a module on the GPU takes
CuPy input (DLPack, no copy) and returns CuPy rows, equal to per-sample
autograd on the CPU (tests/test_torch_source.py's oracle); ``extract
--framework torch --device gpu`` writes the store the NumPy reference
sparsifier makes of those rows. Skipped without a CUDA device
(tests/gpu/conftest.py) or where torch sees none."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from gradnet_cupy.backend import import_cupy, to_numpy  # noqa: E402
from gradnet_cupy.data import load_dataset  # noqa: E402
from gradnet_cupy.kernels import percentile_sparsify  # noqa: E402
from gradnet_cupy.store import TangentStore  # noqa: E402
from gradnet_cupy.tangent import TorchSource  # noqa: E402
from test_torch_source import (  # noqa: E402
    N_CLASSES, TOLERANCE, conv1d3d_net, conv2d_net, invoke, model_files,
    reference_rows, relative_errors)

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


@pytest.mark.parametrize('build, dtype, include_bias', [
    (conv2d_net, torch.float64, True), (conv2d_net, torch.float32, False),
    (conv1d3d_net, torch.float64, False), (conv1d3d_net, torch.float32, True)])
def test_cuda_rows_equal_cpu_per_sample_autograd(build, dtype, include_bias):
    torch.manual_seed(0)
    net, in_shape = build()
    net = net.to(dtype).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4,) + in_shape).astype(
        torch.empty((), dtype=dtype).numpy().dtype)
    labels = rng.integers(0, N_CLASSES, 4)
    source = TorchSource(copy.deepcopy(net).cuda(),
                         include_bias=include_bias)
    for mode, per_sample in [
            ('all', np.tile(np.arange(N_CLASSES), (4, 1))),
            ('true', labels[:, None])]:
        batch = source.rows(cupy.asarray(x), labels, mode)
        assert isinstance(batch.features, cupy.ndarray)
        assert batch.features.dtype == x.dtype
        want = reference_rows(net, source.names, x, per_sample)
        assert relative_errors(to_numpy(batch.features), want).max() \
            <= TOLERANCE[dtype]
        assert (to_numpy(batch.candidate) == per_sample.reshape(-1)).all()


def test_cli_gpu_extraction_is_the_reference_sparsifier_of_cuda_rows(
        model_files, tmp_path):
    folder, net = model_files
    out = tmp_path / 'test.h5'
    result = invoke('extract', '--framework', 'torch', '--model',
                    f'{folder}/model.py:small', '--weights',
                    folder / 'small.pt', '--split', 'test', '--subset', 3,
                    '--candidates', 'all', '--q', 80, '--device', 'gpu',
                    '--out', out, '--json')
    assert result.exit_code == 0, result.output
    source = TorchSource(copy.deepcopy(net).cuda())
    data = load_dataset('mnist', subset=3)
    x, y = data.test
    x = data.eval_transform(x)
    rows = to_numpy(source.rows(cupy.asarray(x), y, 'all').features)
    want = percentile_sparsify(rows, source.layout.block_sizes,
                               80.0).to_scipy().toarray()
    with TangentStore.open(out) as store:
        assert store.layout == source.layout.to_dict()
        batch = store.read(0, len(store))
    assert (batch.target == y.repeat(10)).all()
    np.testing.assert_allclose(batch.csr.to_scipy().toarray(), want,
                               rtol=1e-6, atol=1e-7)
