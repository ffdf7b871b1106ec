"""Tier 2: every CUDA source of gradnet_cupy.kernels compiles with nvcc for
the Ampere and Hopper targets (no GPU needed), with the template kernels
instantiated as the wrappers instantiate them. Without nvcc the tests fail
when the environment variable CI is set and are skipped otherwise."""
import subprocess
from pathlib import Path

import pytest

from cuda_emulation import require_tool

from gradnet_cupy.kernels import block_outer

KERNELS = Path(__file__).resolve().parents[1] / 'kernels'
SOURCES = sorted(KERNELS.glob('*.cu'))
# the CuPy name expressions (template instantiations) of each source
NAME_EXPRESSIONS = {block_outer.CUDA_SOURCE: block_outer.CUDA_NAME_EXPRESSIONS}


def test_kernel_sources_exist():
    assert [p.name for p in SOURCES] and all(p.stat().st_size for p in SOURCES)


@pytest.mark.parametrize('arch', ['sm_80', 'sm_90'])
@pytest.mark.parametrize('source', SOURCES, ids=[p.name for p in SOURCES])
def test_source_compiles(source, arch, tmp_path):
    nvcc = require_tool('nvcc')
    unit = tmp_path / 'unit.cu'     # the source, then its instantiations
    unit.write_text(f'#include "{source}"\n' + ''.join(
        f'void* instantiation_{i} = (void*)&{expression};\n'
        for i, expression in enumerate(NAME_EXPRESSIONS.get(source.name,
                                                            ()))))
    result = subprocess.run(
        [nvcc, '-std=c++17', f'-arch={arch}', '-Werror', 'all-warnings',
         '-c', str(unit), '-o', str(tmp_path / 'kernel.o')],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_template_instantiations_are_compiled(tmp_path):
    """A wrong name expression fails the compile check (so the check does
    compile the instantiations)."""
    nvcc = require_tool('nvcc')
    unit = tmp_path / 'unit.cu'
    unit.write_text(f'#include "{KERNELS / block_outer.CUDA_SOURCE}"\n'
                    'void* wrong = (void*)&block_outer<float, 8, 1>;\n')
    result = subprocess.run([nvcc, '-std=c++17', '-arch=sm_90', '-c',
                             str(unit), '-o', str(tmp_path / 'kernel.o')],
                            capture_output=True, text=True)
    assert result.returncode != 0


def test_sources_ship_with_the_package():
    from gradnet_cupy.kernels._cuda import read_source

    for path in SOURCES:
        assert read_source(path.name) == path.read_text(encoding='utf-8')
