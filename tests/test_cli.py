"""The gradnet-cupy command line: help, errors, train-base."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gradnet_cupy import backend
from gradnet_cupy.cli import main

COMMANDS = ['train-base', 'extract', 'merge', 'fit', 'evaluate', 'demo']


def run(*args):
    return CliRunner().invoke(main, list(args))


def one_error_line(result):
    # CliRunner keeps an exception that escaped the command in
    # result.exception (never a traceback in the output): it must be the
    # SystemExit of the one-line error
    assert isinstance(result.exception, SystemExit), result.exc_info
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('error: ')
    return lines[0]


def test_group_help_lists_commands():
    result = run('--help')
    assert result.exit_code == 0
    listed = result.stdout.split('Commands:')[1].split()
    for command in COMMANDS:
        assert command in listed


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_has_help_with_shared_options(command):
    result = run(command, '--help')
    assert result.exit_code == 0, result.output
    options = {word.rstrip(',') for word in result.stdout.split()
               if word.startswith('--')}
    assert {'--device', '--seed', '--json'} <= options
    # and the command really takes them: a bad value is refused by click
    bad = run(command, '--device', 'tpu')
    assert bad.exit_code == 2 and "'tpu'" in one_error_line(bad)


def test_bare_command_shows_usage():
    result = run()
    assert result.exit_code in (0, 2)           # click < 8.2 / >= 8.2
    assert 'Usage:' in result.output and 'error:' not in result.output


def test_train_base_help_lists_its_options():
    text = run('train-base', '--help').stdout
    for option in ('--dataset', '--data-dir', '--model', '--epochs',
                   '--batch', '--lr', '--momentum', '--weight-decay',
                   '--optimizer', '--stop-at-accuracy', '--subset', '--out'):
        assert option in text


def test_bad_dataset_name_is_one_line(tmp_path):
    result = run('train-base', '--dataset', 'imagenet', '--out',
                 str(tmp_path))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert 'imagenet' in line and 'mnist' in line and 'cifar10' in line


def test_library_error_is_one_line(tmp_path):
    result = run('train-base', '--data-dir', str(tmp_path / 'absent'),
                 '--out', str(tmp_path / 'out'), '--device', 'cpu')
    assert result.exit_code == 1
    assert 'absent does not exist' in one_error_line(result)


def test_device_gpu_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(backend, 'gpu_available', lambda: False)
    result = run('train-base', '--device', 'gpu', '--out', str(tmp_path))
    assert result.exit_code == 1
    assert '--device gpu was asked for' in one_error_line(result)
    assert os.listdir(tmp_path) == []


def test_train_base_json_summary(tmp_path):
    out = tmp_path / 'run'
    result = run('train-base', '--model', 'mlp', '--subset', '1000',
                 '--epochs', '4', '--lr', '0.05', '--out', str(out),
                 '--device', 'cpu', '--seed', '3', '--json')
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary['epochs_run'] == 4 and summary['device'] == 'cpu'
    assert summary['test_accuracy'] > 0.5             # chance is 0.1
    records = json.load(open(out / 'snapshots.json'))
    assert records == summary['snapshots']
    assert all((out / r['path']).is_file() for r in records)
    assert json.load(open(out / 'base.json'))['seed'] == 3
    # A second run into the same folder is refused, as one line.
    again = run('train-base', '--model', 'mlp', '--subset', '200',
                '--epochs', '1', '--out', str(out), '--device', 'cpu')
    assert again.exit_code == 1
    assert 'already holds a training run' in one_error_line(again)


def test_console_script_error_exit(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), 'gradnet-cupy')
    proc = subprocess.run([script, 'train-base', '--model', 'vgg', '--out',
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == '' and 'Traceback' not in proc.stderr
    # (CuPy without its CUDA libraries may print a warning before.)
    last = proc.stderr.rstrip('\n').splitlines()[-1]
    assert last.startswith('error: ') and "'vgg'" in last
