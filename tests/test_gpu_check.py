"""bench/gpu_check.sh on a machine without a GPU: its argument and
environment checks stop it with one line and exit status 2 before anything
is installed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'bench' / 'gpu_check.sh'


def run(*args, env=None):
    return subprocess.run(['bash', str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env=env)


def test_a_missing_wheel_folder_is_named(tmp_path):
    result = run(tmp_path / 'no-wheels', tmp_path / 'out')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: no wheel folder {tmp_path / "no-wheels"} (see the recipe '
        f'in {SCRIPT})']
    assert not (tmp_path / 'out' / 'log.txt').read_text()


def test_no_cupy_or_device_stops_before_installing(tmp_path):
    """python3 on PATH is one whose CuPy import fails (a stand-in script)."""
    wheels = tmp_path / 'wheels'
    wheels.mkdir()
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake = bin_dir / 'python3'
    fake.write_text('#!/bin/sh\necho "No module named cupy" >&2\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}/usr/bin:/bin'}
    result = run(wheels, tmp_path / 'out', env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        'error: python3 with NumPy and CuPy and a CUDA device is needed')
    log = (tmp_path / 'out' / 'log.txt').read_text()
    assert 'No module named cupy' in log and '=== install' not in log


@pytest.mark.skipif(sys.platform != 'linux', reason='bash script for Linux')
def test_the_script_parses():
    assert subprocess.run(['bash', '-n', str(SCRIPT)]).returncode == 0
