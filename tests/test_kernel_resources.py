"""Resource budgets of every CUDA kernel, from nvcc's ptxas report (no GPU
needed): no register spills, no stack frame, static shared memory within
48 KiB per block, and a theoretical occupancy of at least 50% for the block
size the wrapper launches with, on sm_80 and sm_90.

The parser, the launch table and the per-SM limits (with their source) are
in gradnet_cupy.kernels._resources, shared with bench/kernel_resources.py,
which prints the figures (bench/results/kernel-resources.json). Without nvcc
the tests fail when the environment variable CI is set and are skipped
otherwise.
"""
import re
from pathlib import Path

import pytest

from cuda_emulation import require_tool

from gradnet_cupy.kernels import _resources

CASES = [pytest.param(source, kernel, threads, arch, id=f'{kernel}-{arch}')
         for source, kernel, threads in _resources.LAUNCHES
         for arch in _resources.ARCHS]


@pytest.mark.parametrize('source, kernel, threads, arch', CASES)
def test_kernel_meets_resource_budget(source, kernel, threads, arch):
    figures = _resources.measure(require_tool('nvcc'), source, kernel, arch)
    assert figures['spill_stores'] == figures['spill_loads'] == 0, figures
    assert figures['stack'] == 0, figures
    assert figures['shared'] <= _resources.STATIC_SHARED_LIMIT, figures
    fraction, limit = _resources.occupancy(figures['registers'],
                                           figures['shared'], threads, arch)
    assert fraction >= 0.5, (f'{kernel} on {arch}: {fraction:.1%} '
                             f'theoretical occupancy ({limit} bound)', figures)


def test_every_kernel_is_budgeted():
    """LAUNCHES names every __global__ function of every kernels/*.cu (a
    template through at least one instantiation), so a new kernel cannot go
    unmeasured."""
    kernels = Path(_resources.__file__).resolve().parent
    defined = {(path.name, match.group(1))
               for path in kernels.glob('*.cu')
               for match in re.finditer(
                   r'__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                   r'(\w+)', path.read_text())}
    listed = {(source, kernel.split('<')[0])
              for source, kernel, _ in _resources.LAUNCHES}
    assert defined and listed == defined


PTXAS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Function properties for helper
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 40960 bytes smem, 448 bytes cmem[0]
ptxas info    : Compiling entry function 'plain' for 'sm_80'
ptxas info    : Function properties for plain
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 352 bytes cmem[0]
"""


def test_parser_reads_each_entry_and_ignores_callees():
    assert _resources.parse_ptxas(PTXAS_REPORT) == {
        'k': dict(stack=8, spill_stores=4, spill_loads=12, registers=72,
                  shared=40960),
        'plain': dict(stack=0, spill_stores=0, spill_loads=0, registers=8,
                      shared=0)}


@pytest.mark.parametrize('registers, shared, threads, arch, expected', [
    # hand-computed with the table in _resources
    (32, 20492, 512, 'sm_80', (1.0, 'threads')),
    (40, 20492, 512, 'sm_90', (0.75, 'registers')),    # 51 warps: 3 blocks
    (32, 40960, 128, 'sm_80', (0.25, 'shared')),       # 4 x 41 KiB
    (32, 40960, 128, 'sm_90', (0.3125, 'shared')),     # 5 x 41 KiB
    (32, 40960, 256, 'sm_80', (0.5, 'shared')),
    (255, 0, 32, 'sm_90', (0.125, 'registers')),       # 8 warps of 8192
    (16, 0, 32, 'sm_80', (0.5, 'blocks'))])
def test_occupancy_arithmetic(registers, shared, threads, arch, expected):
    assert _resources.occupancy(registers, shared, threads, arch) == expected
