"""Tier 2: every CUDA source of gradnet_cupy.kernels compiles with nvcc for
the Ampere and Hopper targets (no GPU needed). Without nvcc the tests fail
when the environment variable CI is set and are skipped otherwise."""
import subprocess
from pathlib import Path

import pytest

from cuda_emulation import require_tool

KERNELS = Path(__file__).resolve().parents[1] / 'kernels'
SOURCES = sorted(KERNELS.glob('*.cu'))


def test_kernel_sources_exist():
    assert [p.name for p in SOURCES] and all(p.stat().st_size for p in SOURCES)


@pytest.mark.parametrize('arch', ['sm_80', 'sm_90'])
@pytest.mark.parametrize('source', SOURCES, ids=[p.name for p in SOURCES])
def test_source_compiles(source, arch, tmp_path):
    nvcc = require_tool('nvcc')
    result = subprocess.run(
        [nvcc, '-std=c++17', f'-arch={arch}', '-Werror', 'all-warnings',
         '-c', str(source), '-o', str(tmp_path / 'kernel.o')],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
