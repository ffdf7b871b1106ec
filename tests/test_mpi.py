"""``--mpi``: extraction and GradNet training over MPI ranks (ChainerMN).

The multi-rank tests run ``mpiexec -n 2 gradnet-cupy ...`` in a subprocess
on the CPU (both ranks on this machine; the ``test`` extra installs mpi4py
and the MPICH wheel) and compare with the single-process command: the
merged store byte for byte, the fitted weights to float32 rounding. Every
subprocess has a timeout, so a hung rank fails the test instead of
stalling the suite.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import main
from gradnet_cupy.data import load_dataset
from gradnet_cupy.kernels import CSR
from gradnet_cupy.models import build_model
from gradnet_cupy.scaleout import Parallel, shard_path
from gradnet_cupy.scaleout.training import rank_rows
from gradnet_cupy.store import StoreWriter, TangentStore
from gradnet_cupy.tangent import ParameterLayout
from gradnet_cupy.train_base import save_snapshot

BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(BIN, 'gradnet-cupy')
MPIEXEC = (os.path.join(BIN, 'mpiexec')
           if os.path.exists(os.path.join(BIN, 'mpiexec'))
           else shutil.which('mpiexec'))
TIMEOUT = 180         # seconds per mpiexec run: a hang fails, never stalls
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec('mpi4py') is None,
    reason='mpiexec or mpi4py missing: pip install -e ".[mpi]" (the test '
           'extra installs them)')

N_TRAIN, N_TEST, N_CLASSES = 45, 20, 3   # 45 rows: a remainder batch


def ranks(*commands):
    """``mpiexec`` running each ``(n, args)`` of ``commands`` as ``n``
    ranks of gradnet-cupy (several: an MPMD job); the CompletedProcess."""
    line = [MPIEXEC]
    for n, args in commands:
        line += [':'] * (len(line) > 1) + ['-n', str(n), SCRIPT] + [
            str(a) for a in args]
    return subprocess.run(line, capture_output=True, text=True,
                          timeout=TIMEOUT)


def ok(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def datasets(path):
    """Every dataset of an HDF5 file: ``{name: bytes}``."""
    found = {}
    with h5py.File(path, 'r') as f:
        f.visititems(lambda name, item: found.__setitem__(
            name, item[()].tobytes()) if isinstance(item, h5py.Dataset)
            else None)
    return found


# ------------------------------------------------------------ extraction --

@needs_mpi
def test_two_ranks_extract_the_single_process_store_bit_for_bit(tmp_path):
    data = load_dataset('mnist', subset=12)
    snapshot = tmp_path / 'mlp.npz'
    save_snapshot(build_model('mlp', data.in_shape, 10, seed=1),
                  str(snapshot))
    common = ('--model', snapshot, '--arch', 'mlp', '--subset', 12, '--q',
              99, '--batch', 4, '--device', 'cpu', '--json')
    single = ok('extract', *common, '--out', tmp_path / 'one.h5')
    # rank 0's shard already done (as after a rank killed later): resumed
    out = tmp_path / 'two.h5'
    done = ok('extract', *common, '--shard', '0/2', '--out',
              shard_path(out, 0, 2))
    result = ranks((2, ['extract', *common, '--out', out, '--mpi']))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1     # rank 0 alone reports
    summary = json.loads(lines[0])
    assert summary['rows'] == single['rows'] == 12
    assert summary['resumed_from_rows'] == done['rows'] > 0
    one, two = datasets(tmp_path / 'one.h5'), datasets(out)
    assert sorted(one) == sorted(two) and 'X/data' in one
    for name in one:
        assert one[name] == two[name], name
    assert sorted(os.listdir(tmp_path)) == ['mlp.npz', 'one.h5', 'two.h5']


# -------------------------------------------------------------- training --

def write_stores(folder):
    """A training store (one random candidate per row) and a test store
    (all candidates) of :data:`N_CLASSES` classes over 32 columns in two
    blocks, with a class signal in column ``7 * label``."""
    layout = ParameterLayout.from_dict({'entries': [
        {'path': '/a', 'name': 'W', 'shape': [4, 5], 'offset': 0,
         'size': 20, 'link_type': 'Linear'},
        {'path': '/b', 'name': 'W', 'shape': [3, 4], 'offset': 20,
         'size': 12, 'link_type': 'Linear'}]}).to_dict()
    provenance = {'model_sha256': 'ab' * 32, 'arch': 'mlp',
                  'dataset': 'mnist', 'q': 80.0, 'n_classes': N_CLASSES}
    rng = np.random.default_rng(0)

    def rows(labels):
        dense = rng.normal(size=(len(labels), 32)).astype(np.float32)
        dense[np.arange(len(labels)), labels * 7] += 3
        dense[rng.random(dense.shape) < 0.6] = 0
        row, column = np.nonzero(dense)
        indptr = np.r_[0, np.cumsum((dense != 0).sum(1))]
        return CSR(indptr.astype(np.int64), column.astype(np.int32),
                   dense[row, column], dense.shape)

    paths = []
    y = rng.integers(0, N_CLASSES, N_TRAIN)
    sample = np.repeat(np.arange(N_TEST), N_CLASSES)
    candidate = np.tile(np.arange(N_CLASSES), N_TEST)
    truth = rng.integers(0, N_CLASSES, N_TEST)[sample]
    for name, mode, labels, per_row in (
            ('train', 'random', y, (np.arange(N_TRAIN), y, y)),
            ('test', 'all', candidate, (sample, candidate, truth))):
        path = folder / f'{name}.h5'
        writer = StoreWriter.create(path, 32, layout,
                                    dict(provenance, candidates=mode),
                                    total_rows=len(labels))
        writer.append(rows(labels), *per_row)
        writer.finalize()
        paths.append(path)
    return paths


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    return write_stores(tmp_path_factory.mktemp('stores'))


def fit_args(stores, out, *extra):
    train, test = stores
    return ['fit', '--train', train, '--test', test, '--epochs', 3,
            '--hidden', '3,2', '--optimizer', 'momentum', '--lr', 0.1,
            '--device', 'cpu', '--json', '--out', out, *extra]


def test_rank_slices_make_up_the_shuffled_global_batches(stores):
    """Rank r's rows are the r-th slice of each global batch of the
    single-process shuffle, and the weights make the ranks' mean of
    weighted sums the global batch's mean (also the remainder batch)."""
    class Rank(Parallel):
        def __init__(self, rank, size):
            self.rank, self.size = rank, size
    with TangentStore.open(stores[0]) as store:
        expected = [b.sample for b in store.iter_batches(
            10, shuffle=True, seed=7)]
        parts = [list(rank_rows(len(store), 5, 7, Rank(r, 2)))
                 for r in range(2)]
    assert [len(p) for p in parts] == [len(expected)] * 2
    for k, rows in enumerate(expected):
        (rows0, w0), (rows1, w1) = parts[0][k], parts[1][k]
        np.testing.assert_array_equal(np.r_[rows0, rows1], rows)
        assert w0.sum() + w1.sum() == pytest.approx(2.0)
        assert len(w0) - len(w1) in (0, 1)


@needs_mpi
def test_two_ranks_of_batch_b_fit_as_one_process_of_batch_2b(stores,
                                                             tmp_path):
    single = ok(*fit_args(stores, tmp_path / 'one', '--batch', 10))
    result = ranks((2, fit_args(stores, tmp_path / 'two', '--batch', 5,
                                '--mpi')))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1           # rank 0 alone reports and writes
    assert sorted(os.listdir(tmp_path)) == ['one', 'two']
    one = np.load(tmp_path / 'one' / 'gradnet.npz')
    two = np.load(tmp_path / 'two' / 'gradnet.npz')
    assert sorted(one.files) == sorted(two.files)
    # float32 sums over a batch in another order: a few ulps per step,
    # 15 steps of lr 0.1 with momentum
    eps = float(np.finfo(np.float32).eps)
    for name in one.files:
        scale = max(1.0, float(np.abs(one[name]).max()))
        np.testing.assert_allclose(two[name], one[name], rtol=0,
                                   atol=1000 * eps * scale, err_msg=name)
    infos = [json.loads((tmp_path / f / 'gradnet.json').read_text())
             for f in ('one', 'two')]
    assert infos[1]['settings']['mpi_ranks'] == 2
    assert 'mpi_ranks' not in infos[0]['settings']
    history = [info['history'] for info in infos]
    assert [h['iteration'] for h in history[1]] == \
        [h['iteration'] for h in history[0]] == [5, 10, 15]
    for a, b in zip(*history):
        assert b['train_loss'] == pytest.approx(a['train_loss'],
                                                rel=1000 * eps)
        assert b['test_accuracy'] == a['test_accuracy']
    assert json.loads(lines[0])['test_accuracy'] == \
        single['test_accuracy']


# ----------------------------------------------------------------- errors --

@needs_mpi
def test_ranks_started_with_different_arguments_all_say_so(stores,
                                                           tmp_path):
    out = tmp_path / 'gn'
    result = ranks((1, fit_args(stores, out, '--mpi')),
                   (1, fit_args(stores, out, '--mpi', '--lr', 0.2)))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines()
             if line.startswith('error:')]
    assert len(lines) == 2, result.stderr
    assert all('different arguments' in line for line in lines)
    assert 'Traceback' not in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('command', ['extract', 'fit'])
def test_mpi_without_mpi4py_is_one_line(command, stores, tmp_path,
                                        monkeypatch):
    monkeypatch.setitem(sys.modules, 'mpi4py', None)   # not installed
    args = (fit_args(stores, tmp_path / 'gn', '--mpi') if command == 'fit'
            else ['extract', '--model', stores[0], '--out',
                  tmp_path / 's.h5', '--device', 'cpu', '--mpi'])
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1
    assert result.output.count('\n') == 1
    assert 'mpi4py is not installed' in result.output
    assert 'pip install "gradnet-cupy[mpi]"' in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('extra', [['--shard', '0/2'],
                                   ['--normalize', 'metric']])
def test_extract_mpi_refuses_shard_and_metric(extra, stores, tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in [
        'extract', '--model', stores[0], '--out', tmp_path / 's.h5',
        '--device', 'cpu', '--mpi', *extra]])
    assert result.exit_code == 1
    assert result.output.count('\n') == 1 and '--mpi' in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('extra', [['--online'], ['--online-test']])
def test_fit_mpi_refuses_online_sources(extra, stores, tmp_path):
    """--mpi splits stores across ranks: an on-the-fly source is refused
    before anything starts (no MPI needed to say so)."""
    train, test = stores
    args = ['fit', '--train', train, '--model', stores[0], '--device', 'cpu',
            '--out', tmp_path / 'gn', '--mpi', *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1
    assert result.output.count('\n') == 1
    assert extra[0] in result.output and '--mpi' in result.output
    assert os.listdir(tmp_path) == []
