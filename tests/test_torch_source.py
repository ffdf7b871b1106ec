"""The PyTorch tangent source (gradnet_cupy.tangent.torch_source): rows
against per-sample autograd in PyTorch (one sample, one backward at a
time) and against the Chainer engine on the same network, the CLI round
trip into a store, and the bad-input errors."""
import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn

from click.testing import CliRunner  # noqa: E402

from gradnet_cupy.backend import to_numpy  # noqa: E402
from gradnet_cupy.chainer_compat import chainer, F, L  # noqa: E402
from gradnet_cupy.cli import main  # noqa: E402
from gradnet_cupy.data import load_dataset  # noqa: E402
from gradnet_cupy.errors import GradnetError  # noqa: E402
from gradnet_cupy.kernels import percentile_sparsify  # noqa: E402
from gradnet_cupy.store import TangentStore  # noqa: E402
from gradnet_cupy.tangent import (  # noqa: E402
    ChainerSource, TorchSource, parameter_layout)
from gradnet_cupy.tangent.torch_source import torch_layout  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
N_CLASSES = 5


def conv2d_net():
    """Grouped, strided, padded, dilated 2-D convolutions with BatchNorm
    (eval mode, non-trivial running statistics) and two Linear layers."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3),
        nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2, bias=False),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 7), nn.ReLU(),
        nn.Linear(7, N_CLASSES))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net, (3, 8, 8)


class Conv1d3dNet(nn.Module):
    """A strided grouped Conv1d and a padded Conv3d beside each other."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2)
        self.vol = nn.Conv3d(1, 2, 2, padding=1, dilation=2)
        self.head = nn.Linear(4 * 4 + 2 * 2 * 2 * 2, N_CLASSES)

    def forward(self, x):
        a = torch.relu(self.seq(x[:, :4, :8].flatten(2)))
        b = torch.sigmoid(self.vol(x[:, 4:5].reshape(len(x), 1, 2, 2, 2)))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


def conv1d3d_net():
    return Conv1d3dNet(), (12, 2, 4)


def reference_rows(net, names, x, candidates):
    """One sample, one candidate, one backward at a time: the selected
    parameters' gradients of the cross-entropy, concatenated in ``names``
    order. candidates: (n, R) int."""
    params = dict(net.named_parameters())
    rows = []
    for i in range(len(x)):
        for c in candidates[i]:
            net.zero_grad()
            z = net(torch.from_numpy(x[i:i + 1]))
            nn.functional.cross_entropy(z, torch.tensor([int(c)])).backward()
            rows.append(torch.cat([params[n].grad.reshape(-1)
                                   for n in names]).numpy())
    return np.stack(rows)


def relative_errors(got, want):
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)


ROW_CASES = [
    (conv2d_net, torch.float64, True), (conv2d_net, torch.float32, False),
    (conv1d3d_net, torch.float64, False), (conv1d3d_net, torch.float32, True)]


def assert_rows_equal_per_sample_autograd(build, dtype, include_bias, xp):
    """The source's rows for every candidate mode against
    :func:`reference_rows` on the CPU. ``xp``: numpy (the module on the
    CPU, NumPy in and out) or cupy (a copy of the module on CUDA, CuPy in
    and out; tests/gpu)."""
    torch.manual_seed(0)
    net, in_shape = build()
    net = net.to(dtype).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3,) + in_shape).astype(
        torch.empty((), dtype=dtype).numpy().dtype)
    labels = rng.integers(0, N_CLASSES, 3)
    module = net if xp is np else copy.deepcopy(net).cuda()
    source = TorchSource(module, include_bias=include_bias)
    for mode, per_sample in [
            ('all', np.tile(np.arange(N_CLASSES), (3, 1))),
            ('true', labels[:, None]),
            (labels[::-1].copy(), labels[::-1, None])]:
        batch = source.rows(xp.asarray(x), labels, mode)
        assert isinstance(batch.features, xp.ndarray)
        assert batch.features.dtype == x.dtype
        want = reference_rows(net, source.names, x, per_sample)
        got = to_numpy(batch.features)
        assert relative_errors(got, want).max() <= TOLERANCE[dtype]
        assert (to_numpy(batch.candidate) == per_sample.reshape(-1)).all()
        assert (to_numpy(batch.sample) == np.repeat(
            np.arange(3), per_sample.shape[1])).all()
        assert (to_numpy(batch.target) == np.repeat(
            labels, per_sample.shape[1])).all()


@pytest.mark.parametrize('build, dtype, include_bias', ROW_CASES)
def test_rows_equal_per_sample_autograd(build, dtype, include_bias):
    assert_rows_equal_per_sample_autograd(build, dtype, include_bias, np)


def test_layout_selects_linear_and_conv_weights_in_module_order():
    net, _ = conv2d_net()
    layout, names = torch_layout(net)
    assert names == ['0.weight', '3.weight', '6.weight', '8.weight']
    assert [(e.path, e.name, e.link_type) for e in layout.entries] == [
        ('/0', 'W', 'Conv2d'), ('/3', 'W', 'Conv2d'), ('/6', 'W', 'Linear'),
        ('/8', 'W', 'Linear')]
    assert layout.block_sizes == (6 * 1 * 9, 4 * 6 * 9, 7 * 64, 5 * 7)
    with_bias, names = torch_layout(net, include_bias=True)
    # conv '3' has no bias: nothing to add there
    assert names == ['0.weight', '0.bias', '3.weight', '6.weight',
                     '6.bias', '8.weight', '8.bias']
    only, names = torch_layout(net, modules=['/6', '8'])
    assert names == ['6.weight', '8.weight']
    assert only.n_params == 7 * 64 + 5 * 7


def test_random_candidates_chunks_and_row_order():
    """'random' draws the Chainer engine's candidates (one draw for all
    samples from the seed); a tiny byte budget cuts whole-sample chunks
    holding the same rows as one chunk."""
    torch.manual_seed(0)
    net, in_shape = conv2d_net()
    net = net.double().eval()
    x = np.random.default_rng(2).standard_normal((7,) + in_shape)
    source = TorchSource(net)
    whole = source.rows(x, None, 'random', seed=3, max_bytes=None)
    drawn = np.random.default_rng(3).integers(0, N_CLASSES, 7)
    assert (whole.candidate == drawn).all() and (whole.target == -1).all()
    chunks = list(source.iter_rows(x, None, 'all', max_bytes=1))
    assert len(chunks) == 7
    assert all((c.sample == i).all() for i, c in enumerate(chunks))
    every = source.rows(x, None, 'all', max_bytes=None)
    np.testing.assert_allclose(
        np.concatenate([c.features for c in chunks]), every.features,
        rtol=0, atol=1e-12 * np.abs(every.features).max())
    pick = np.arange(7) * N_CLASSES + drawn
    np.testing.assert_allclose(whole.features, every.features[pick],
                               rtol=0, atol=1e-12 *
                               np.abs(every.features).max())


def test_rows_are_computed_without_tf32_and_the_flags_restored(monkeypatch):
    """Inside a chunk's computation torch's cuDNN convolutions and matrix
    products are set to IEEE precision (no TF32); before and after, the
    user's settings, here TF32 for both, are in place."""
    conv = torch.backends.cudnn.conv
    matmul = torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = 'tf32'
    try:
        seen, after = _precision_during_rows(monkeypatch, conv, matmul)
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
    assert seen == [('ieee', 'ieee')] * 2
    assert after == ('tf32', 'tf32')


def _precision_during_rows(monkeypatch, conv, matmul):
    """(precisions seen by each of two chunks' computation, precisions
    after the iteration)."""
    net, in_shape = conv2d_net()
    source = TorchSource(net.eval())
    seen = []
    rows = source._rows

    def recording(*args):
        seen.append((conv.fp32_precision, matmul.fp32_precision))
        return rows(*args)

    monkeypatch.setattr(source, '_rows', recording)
    x = np.zeros((2,) + in_shape, np.float32)
    chunks = list(source.iter_rows(x, None, 'all', max_bytes=1))
    assert len(chunks) == 2
    return seen, (conv.fp32_precision, matmul.fp32_precision)


# -- the same network in Chainer and in PyTorch ----------------------------

def _chainer_mlp(net):
    with chainer.using_config('dtype', np.float64):
        return chainer.Sequential(*[
            L.Linear(m.in_features, m.out_features,
                     initialW=m.weight.detach().numpy(),
                     initial_bias=m.bias.detach().numpy())
            if isinstance(m, nn.Linear) else F.relu for m in net])


class ChainerConvNet(chainer.Chain):
    def __init__(self, net):
        super().__init__()
        conv1, conv2, fc = net.conv1, net.conv2, net.fc

        def conv(m):
            return L.Convolution2D(
                m.in_channels, m.out_channels, m.kernel_size, m.stride,
                m.padding, dilate=m.dilation, groups=m.groups,
                initialW=m.weight.detach().numpy(),
                initial_bias=m.bias.detach().numpy())
        with chainer.using_config('dtype', np.float64), self.init_scope():
            self.conv1 = conv(conv1)
            self.conv2 = conv(conv2)
            self.fc = L.Linear(fc.in_features, fc.out_features,
                               initialW=fc.weight.detach().numpy(),
                               initial_bias=fc.bias.detach().numpy())

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.fc(F.tanh(self.conv2(h)))


class TorchConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, N_CLASSES)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


@pytest.mark.parametrize('kind, include_bias', [('mlp', False),
                                                 ('conv', True)])
def test_rows_equal_the_chainer_engine(kind, include_bias):
    torch.manual_seed(4)
    if kind == 'mlp':
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7),
                            nn.ReLU(), nn.Linear(7, N_CLASSES)).double()
        model, in_shape = _chainer_mlp(net), (6,)
    else:
        net = TorchConvNet().double()
        model, in_shape = ChainerConvNet(net), (2, 6, 6)
    x = np.random.default_rng(5).standard_normal((6,) + in_shape)
    labels = np.arange(6) % N_CLASSES
    theirs = ChainerSource(model, parameter_layout(
        model, include_bias=include_bias))
    ours = TorchSource(net.eval(), include_bias=include_bias)
    assert [e.shape for e in ours.layout.entries] == \
        [e.shape for e in theirs.layout.entries]
    assert ours.layout.block_sizes == theirs.layout.block_sizes
    for mode in ('all', 'random', 'true'):
        want = theirs.rows(x, labels, mode, seed=7)
        got = ours.rows(x, labels, mode, seed=7)
        for a, b in zip(got[1:], want[1:]):
            assert (a == b).all()
        assert relative_errors(got.features, want.features).max() <= 1e-10


# -- the CLI ---------------------------------------------------------------

MODEL_FILE = '''
import torch
from torch import nn


def small():
    return nn.Sequential(nn.Conv2d(1, 3, 5, stride=3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def with_batchnorm():
    return nn.Sequential(nn.Conv2d(1, 3, 5, stride=3), nn.BatchNorm2d(3),
                         nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def activations():
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def not_a_module():
    return 'small'


def fails():
    raise ValueError('no such width')
'''


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('torch_model')
    (folder / 'model.py').write_text(MODEL_FILE)
    namespace = {}
    exec(MODEL_FILE, namespace)
    torch.manual_seed(0)
    net = namespace['small']()
    torch.save(net.state_dict(), folder / 'small.pt')
    torch.save(namespace['with_batchnorm']().state_dict(), folder / 'bn.pt')
    torch.save({'0.weight': torch.zeros(3, 1, 5, 5)}, folder / 'part.pt')
    torch.save({}, folder / 'empty.pt')
    return folder, net.eval()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result):
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


def assert_cli_round_trip(model_files, tmp_path, xp):
    """``extract --framework torch`` of 3 test digits (all candidates,
    q = 80) on the CPU (``xp`` numpy) or the GPU (cupy) stores what the
    NumPy reference sparsifier makes of the source's rows on that device."""
    folder, net = model_files
    out = tmp_path / 'test.h5'
    result = invoke('extract', '--framework', 'torch', '--model',
                    f'{folder}/model.py:small', '--weights',
                    folder / 'small.pt', '--split', 'test', '--subset', 3,
                    '--candidates', 'all', '--q', 80, '--device',
                    'cpu' if xp is np else 'gpu', '--out', out, '--json')
    assert result.exit_code == 0, result.output
    source = TorchSource(net if xp is np else copy.deepcopy(net).cuda())
    data = load_dataset('mnist', subset=3)
    x, y = data.test
    x = data.eval_transform(x)
    rows = source.rows(xp.asarray(x), y, 'all')
    want = percentile_sparsify(to_numpy(rows.features),
                               source.layout.block_sizes,
                               80.0).to_scipy().toarray()
    with TangentStore.open(out) as store:
        assert store.layout == source.layout.to_dict()
        assert store.provenance['arch'] == 'torch:small'
        batch = store.read(0, len(store))
    assert (batch.sample == to_numpy(rows.sample)).all()
    assert (batch.candidate == to_numpy(rows.candidate)).all()
    assert (batch.target == y.repeat(10)).all()
    np.testing.assert_allclose(batch.csr.to_scipy().toarray(), want,
                               rtol=1e-6, atol=1e-7)


def test_cli_round_trip_into_a_store(model_files, tmp_path):
    assert_cli_round_trip(model_files, tmp_path, np)


@pytest.mark.parametrize('factory, weights, message', [
    ('activations', 'empty.pt', 'has no Linear/Conv1d/Conv2d/Conv3d layer'),
    ('not_a_module', 'small.pt', 'returned a str, not a torch.nn.Module'),
    ('small', 'part.pt', 'does not match the module: 3 missing keys, e.g. '
                         '0.bias'),
    ('small', 'bn.pt', 'does not match the module: 5 unexpected keys, e.g. '
                       '1.weight'),
    ('with_batchnorm', 'bn.pt', "training mode and has BatchNorm2d '/1'"),
    ('absent', 'small.pt', 'has no callable'),
    ('fails', 'small.pt', 'fails() raised ValueError: no such width'),
])
def test_cli_bad_torch_models_are_one_line_errors(model_files, tmp_path,
                                                  factory, weights, message):
    folder, _ = model_files
    result = invoke('extract', '--framework', 'torch', '--model',
                    f'{folder}/model.py:{factory}', '--weights',
                    folder / weights, '--subset', 2, '--device', 'cpu',
                    '--out', tmp_path / 'x.h5')
    assert message in one_error_line(result)
    assert not (tmp_path / 'x.h5').exists()


def test_cli_framework_options(model_files, tmp_path):
    folder, _ = model_files
    spec = f'{folder}/model.py:small'
    for args, message in [
            (['--model', spec], 'path:factory is for --framework torch'),
            (['--framework', 'torch', '--model', spec],
             'needs --weights'),
            (['--framework', 'torch', '--model', spec, '--weights',
              folder / 'small.pt', '--arch', 'mlp'],
             '--arch is for --framework chainer'),
            (['--framework', 'torch', '--model', f'{folder}/none.py:small',
              '--weights', folder / 'small.pt'], 'none.py')]:
        result = invoke('extract', *args, '--out', tmp_path / 'x.h5')
        assert message in one_error_line(result)


def test_source_errors():
    torch.manual_seed(0)
    net, in_shape = conv2d_net()
    with pytest.raises(GradnetError, match='training mode and has '
                       "BatchNorm2d '/1'"):
        TorchSource(net)
    with pytest.raises(GradnetError, match='no Linear/Conv1d'):
        TorchSource(nn.Sequential(nn.ReLU()).eval())
    with pytest.raises(GradnetError, match='needs a torch.nn.Module'):
        TorchSource(lambda x: x)
    source = TorchSource(net.eval())
    x = np.zeros((2,) + in_shape, np.float64)
    with pytest.raises(GradnetError, match='x is float64 but'):
        source.rows(x)
    with pytest.raises(GradnetError, match=r'candidates must lie in \[0, 5\)'):
        source.rows(x.astype(np.float32), None, np.array([0, 5]))
    with pytest.raises(GradnetError, match='must return logits'):
        TorchSource(nn.Sequential(nn.Linear(3, 2), nn.Flatten(0))).rows(
            np.zeros((2, 3), np.float32))


def test_package_works_without_torch():
    """With torch unimportable the package and the CLI import; the torch
    source raises one line naming the extra."""
    code = (
        'import sys; sys.modules["torch"] = None\n'
        'import gradnet_cupy.cli, gradnet_cupy.tangent as t\n'
        'from gradnet_cupy.errors import GradnetError\n'
        'try:\n'
        '    t.TorchSource(None)\n'
        'except GradnetError as e:\n'
        '    print(e)\n')
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', code],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith('pip install "gradnet-cupy[torch]"')
    assert len(out.strip().splitlines()) == 1
