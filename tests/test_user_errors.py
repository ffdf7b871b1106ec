"""Every failure a user can cause (issue #20): bad numbers, empty stores,
mismatched stores, a killed fit, a full disk, a read-only place, a float64
batch. Each ends in one ``error:`` line (no traceback) and leaves nothing
half-written under a final name; a killed fit resumes to the bits of an
uninterrupted one."""
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import main
from gradnet_cupy.data import load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet import training as training_module
from gradnet_cupy.models import build_model
from gradnet_cupy.store import StoreWriter, TangentStore
from gradnet_cupy.tangent import tangent_features
from gradnet_cupy.train_base import save_snapshot

SUBSET = 12
SCRIPT = os.path.join(os.path.dirname(sys.executable), 'gradnet-cupy')


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result, code):
    """The one ``error:`` line of a failed command (exit status ``code``);
    an exception other than the command's SystemExit fails the test."""
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    """Two different snapshots of the MLP base (seeds 3 and 4)."""
    data = load_dataset('mnist', subset=SUBSET)
    folder = tmp_path_factory.mktemp('base')
    paths = []
    for seed in (3, 4):
        path = folder / f'mlp{seed}.npz'
        save_snapshot(build_model('mlp', data.in_shape, 10, seed=seed),
                      str(path))
        paths.append(path)
    return paths


def extract_args(snapshot, out, *extra):
    return ('extract', '--model', snapshot, '--arch', 'mlp', '--subset',
            SUBSET, '--out', out, '--device', 'cpu', '--json', *extra)


@pytest.fixture(scope='module')
def stores(snapshots, tmp_path_factory):
    """train.h5 (random candidates) and test.h5 (all) of snapshot 0,
    other_test.h5 (all candidates) of snapshot 1."""
    folder = tmp_path_factory.mktemp('stores')
    ok(*extract_args(snapshots[0], folder / 'train.h5'))
    ok(*extract_args(snapshots[0], folder / 'test.h5', '--split', 'test',
                     '--candidates', 'all'))
    ok(*extract_args(snapshots[1], folder / 'other_test.h5', '--split',
                     'test', '--candidates', 'all'))
    return {name: folder / f'{name}.h5'
            for name in ('train', 'test', 'other_test')}


# ------------------------------------------------------------ bad numbers --

BAD_NUMBERS = [
    ('extract', '--batch', '0'), ('extract', '--batch', '-1'),
    ('extract', '--q', '0'), ('extract', '--q', 'nan'),
    ('extract', '--subset', '0'),
    ('fit', '--epochs', '0'), ('fit', '--batch', '0'), ('fit', '--lr', '0'),
    ('fit', '--lr', 'nan'), ('fit', '--dropout', '1'),
    ('fit', '--momentum', '-0.1'), ('fit', '--hidden-total', '0'),
    ('fit', '--eval-every', '-1'), ('fit', '--weight-decay', 'inf'),
    ('train-base', '--epochs', '0'), ('train-base', '--batch', '-3'),
    ('demo', '--epochs', '0'), ('demo', '--base-epochs', '0'),
    ('extract', '--seed', '-1'),
]


@pytest.mark.parametrize('command,option,value', BAD_NUMBERS)
def test_bad_numbers_are_refused_before_any_work(
        tmp_path, snapshots, stores, command, option, value):
    out = tmp_path / 'out'
    needs = {'extract': ('--model', snapshots[0], '--arch', 'mlp', '--out',
                         tmp_path / 'x.h5'),
             'fit': ('--train', stores['train'], '--test', stores['test'],
                     '--out', out),
             'train-base': ('--out', out), 'demo': ('--out', out)}[command]
    result = invoke(command, option, value, *needs, '--device', 'cpu')
    line = one_error_line(result, 2)
    assert option in line and value in line
    assert os.listdir(tmp_path) == []       # nothing written, no .partial


def test_the_real_command_prints_one_line_not_a_traceback(tmp_path,
                                                          snapshots):
    """The console script in a subprocess: real stderr, real exit status."""
    base = ['--model', str(snapshots[0]), '--arch', 'mlp', '--subset',
            str(SUBSET), '--device', 'cpu']
    for args in (['extract', '--batch', '0', *base, '--out',
                  str(tmp_path / 'x.h5')],
                 ['fit', '--epochs', '0', '--online', *base, '--out',
                  str(tmp_path / 'gn')],
                 ['merge', str(snapshots[0]), '--out',
                  str(tmp_path / 'absent' / 'm.h5')]):
        proc = subprocess.run([SCRIPT, *args], capture_output=True,
                              text=True)
        assert proc.returncode in (1, 2), proc.stderr
        assert 'Traceback' not in proc.stderr and proc.stdout == ''
        # (CuPy without its CUDA libraries may print a warning before.)
        assert proc.stderr.rstrip('\n').splitlines()[-1].startswith(
            'error: '), proc.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ empty stores --

def write_empty_store(path):
    provenance = {'q': 90.0, 'n_classes': 10, 'candidates': 'all'}
    writer = StoreWriter.create(path, 5, {'block_sizes': [5]}, provenance,
                                total_rows=0)
    return writer.finalize()


def test_fit_on_an_empty_store_is_one_line(tmp_path):
    empty = write_empty_store(tmp_path / 'empty.h5')
    line = one_error_line(invoke('fit', '--train', empty, '--test', empty,
                                 '--out', tmp_path / 'gn'), 1)
    assert 'empty.h5' in line and 'no rows' in line
    assert sorted(os.listdir(tmp_path)) == ['empty.h5']


# --------------------------------------------------------- mismatched stores --

def test_a_test_store_of_random_candidates_is_refused(stores, tmp_path):
    line = one_error_line(invoke('fit', '--train', stores['train'], '--test',
                                 stores['train'], '--out', tmp_path / 'gn'),
                          1)
    assert '--candidates random' in line and '--candidates all' in line
    assert os.listdir(tmp_path) == []


def test_a_test_store_of_another_snapshot_is_refused(stores, tmp_path):
    line = one_error_line(invoke('fit', '--train', stores['train'], '--test',
                                 stores['other_test'], '--out',
                                 tmp_path / 'gn'), 1)
    assert 'other_test.h5' in line and 'model_sha256' in line
    # evaluate checks the same against what the fit recorded
    ok('fit', '--train', stores['train'], '--test', stores['test'],
       '--epochs', 1, '--out', tmp_path / 'gn', '--json')
    line = one_error_line(invoke('evaluate', '--gradnet', tmp_path / 'gn',
                                 '--test', stores['other_test']), 1)
    assert 'model_sha256' in line
    line = one_error_line(invoke('evaluate', '--gradnet', tmp_path / 'gn',
                                 '--test', stores['train']), 1)
    assert '--candidates random' in line


# ---------------------------------------------------------------- fit kill --

def weights(folder):
    with np.load(folder / 'gradnet.npz') as npz:
        return {key: npz[key] for key in npz.files}


def test_a_killed_fit_resumes_to_the_uninterrupted_weights(
        stores, tmp_path, monkeypatch):
    fit = ('fit', '--train', stores['train'], '--test', stores['test'],
           '--epochs', 3, '--batch', 4, '--optimizer', 'momentum',
           '--dropout', 0.3, '--eval-every', 5, '--device', 'cpu', '--json')
    whole = tmp_path / 'whole'
    ok(*fit, '--out', whole)

    killed = tmp_path / 'killed'
    steps_per_epoch = -(-SUBSET // 4)
    real_step, calls = training_module.train_step, []

    def dying_step(*args):
        calls.append(1)
        if len(calls) == steps_per_epoch + 2:      # inside epoch 2
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(training_module, 'train_step', dying_step)
    assert one_error_line(invoke(*fit, '--out', killed), 1) == \
        'error: aborted'
    monkeypatch.setattr(training_module, 'train_step', real_step)
    # nothing under the final name; the work folder holds epoch 1
    assert not killed.exists()
    assert sorted(os.listdir(tmp_path / 'killed.partial')) == [
        'checkpoint.npz', 'gradnet.json']

    # a rerun with other arguments is refused, naming them
    line = one_error_line(invoke(*fit[:-1], '--lr', 0.02, '--json', '--out',
                                 killed), 1)
    assert 'lr: 0.01 (now 0.02)' in line

    ok(*fit, '--out', killed)
    assert not (tmp_path / 'killed.partial').exists()
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    histories = [json.loads((f / 'gradnet.json').read_text())['history']
                 for f in (whole, killed)]
    assert histories[0] == histories[1]

    # a finished fit: the same command only reports it, another one is
    # refused, --overwrite starts anew
    assert ok(*fit, '--out', killed).output == \
        ok(*fit, '--out', whole).output.replace(str(whole), str(killed))
    one_error_line(invoke(*fit[:-1], '--epochs', 2, '--json', '--out',
                          killed), 1)
    ok(*fit[:-1], '--epochs', 2, '--json', '--out', killed, '--overwrite')
    assert len(json.loads(
        (killed / 'gradnet.json').read_text())['history']) < 20


def test_overwrite_never_replaces_a_folder_that_is_not_a_fit(stores,
                                                             tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    for extra in ((), ('--overwrite',)):
        line = one_error_line(invoke(
            'fit', '--train', stores['train'], '--test', stores['test'],
            '--out', tmp_path, *extra), 1)
        assert 'not a fit' in line
    assert (tmp_path / 'notes.txt').read_text() == 'mine'


# ------------------------------------------------------- disk full, no room --

def limited_file_size(limit):
    """preexec_fn of a child whose files cannot grow past ``limit`` bytes:
    a write beyond gets EFBIG ("File too large"), as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_extract_on_a_full_disk_is_one_line_then_resumes(tmp_path,
                                                         snapshots):
    out = tmp_path / 'full.h5'
    # batches of 2 samples x 10 candidates are about 4 MB of journal each:
    # two fit under the limit, the third does not
    args = [str(a) for a in extract_args(snapshots[0], out, '--split',
                                         'test', '--candidates', 'all',
                                         '--batch', 2)]
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                          preexec_fn=limited_file_size(10_000_000))
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    last = proc.stderr.rstrip('\n').splitlines()[-1]
    assert last.startswith('error: ') and 'full.h5' in last \
        and 'File too large' in last, proc.stderr
    assert not out.exists()                 # nothing under the final name
    # the committed batches survive: a rerun without the limit resumes and
    # gives the bits of an uninterrupted extraction
    resumed = json.loads(ok(*args).output)
    assert resumed['resumed_from_rows'] in (20, 40)
    whole = tmp_path / 'whole.h5'
    ok(*extract_args(snapshots[0], whole, '--split', 'test', '--candidates',
                     'all', '--batch', 2))
    with TangentStore.open(out) as a, TangentStore.open(whole) as b:
        ra, rb = a.read(0, len(a)), b.read(0, len(b))
    np.testing.assert_array_equal(ra.csr.data, rb.csr.data)
    np.testing.assert_array_equal(ra.csr.indices, rb.csr.indices)
    assert sorted(os.listdir(tmp_path)) == ['full.h5', 'whole.h5']


def test_fit_on_a_full_disk_is_one_line(tmp_path, stores):
    proc = subprocess.run(
        [SCRIPT, 'fit', '--train', str(stores['train']), '--test',
         str(stores['test']), '--epochs', '1', '--out', str(tmp_path / 'gn'),
         '--json'], capture_output=True, text=True,
        preexec_fn=limited_file_size(20_000))
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    last = proc.stderr.rstrip('\n').splitlines()[-1]
    assert last.startswith('error: ') and 'gn.partial' in last \
        and 'File too large' in last, proc.stderr
    assert not (tmp_path / 'gn').exists()
    assert not any(name.endswith('.tmp')
                   for name in os.listdir(tmp_path / 'gn.partial'))


def read_only_folder(tmp_path):
    """A folder this process cannot create files in: a chmod-ed folder, or
    (as root, whom chmod does not stop) sysfs; None when there is none."""
    if os.geteuid() != 0:
        folder = tmp_path / 'read-only'
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        open('/sys/gradnet-cupy-probe', 'x').close()
    except PermissionError:
        return '/sys'
    except OSError:
        return None
    os.remove('/sys/gradnet-cupy-probe')
    return None


def denied(line):
    """EACCES or EPERM (sysfs refuses mkdir with the latter)."""
    return 'ermission denied' in line or 'not permitted' in line


def test_permission_denied_is_one_line_naming_the_path(tmp_path, snapshots,
                                                       stores):
    folder = read_only_folder(tmp_path)
    if folder is None:
        pytest.skip('no folder this process cannot write to')
    line = one_error_line(invoke(*extract_args(
        snapshots[0], os.path.join(folder, 'x.h5'))), 1)
    assert os.path.join(folder, 'x.h5') in line and denied(line)
    line = one_error_line(invoke('fit', '--train', stores['train'], '--test',
                                 stores['test'], '--epochs', 1, '--out',
                                 os.path.join(folder, 'gn')), 1)
    assert os.path.join(folder, 'gn') in line and denied(line)


# ------------------------------------------------------------------ dtypes --

def test_a_float64_batch_into_a_float32_model_is_named():
    data = load_dataset('mnist', subset=4)
    model = build_model('mlp', data.in_shape, 10, seed=0)
    x = data.test[0].astype(np.float64)
    with pytest.raises(GradnetError, match='x is float64 but the model'):
        tangent_features(model, x, data.test[1])



def test_a_failed_metric_save_leaves_no_tmp(tmp_path, monkeypatch):
    from gradnet_cupy.metric import feature_metric
    from gradnet_cupy.metric import file as metric_file
    from gradnet_cupy.tangent import parameter_layout
    data = load_dataset('mnist', subset=4)
    metric = feature_metric(parameter_layout(
        build_model('mlp', data.in_shape, 10, seed=0)), 'per_layer', 16)

    def full_disk(_):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(metric_file, 'to_numpy', full_disk)
    with pytest.raises(OSError, match='No space left'):
        metric.save(tmp_path / 'train.metric.h5')
    assert os.listdir(tmp_path) == []
