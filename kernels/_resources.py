"""Resource use of this package's CUDA kernels, as ptxas reports it, and the
theoretical occupancy it allows.

:func:`measure` compiles a kernel of ``kernels/*.cu`` with
``nvcc -std=c++17 -arch=sm_XX -Xptxas -v --resource-usage`` (a template
kernel through a one-line instantiation of the CuPy name expression its
wrapper uses) and parses registers per thread, spill stores and loads, stack
frame and static shared memory; :func:`occupancy` turns them and the block
size of the wrapper's launch into the fraction of an SM's thread slots that
can be resident. :data:`LAUNCHES` lists every kernel with the block size its
wrapper launches it with. Used by tests/test_kernel_resources.py (the
budgets) and bench/kernel_resources.py (the table in
bench/results/kernel-resources.json). nvcc, not CuPy's NVRTC, so the figures
are those of the nvcc build of the same source (NVRTC runs the same ptxas
back end; the options differ in -ftz=true, which CuPy adds).
"""
import math
import re
import subprocess
import tempfile
from pathlib import Path

from gradnet_cupy.kernels import block_outer, sparsify

ARCHS = ('sm_80', 'sm_90')
# Per-SM limits of compute capability 8.0 and 9.0, from the CUDA C++
# Programming Guide, "Features and Technical Specifications", table
# "Technical Specifications per Compute Capability" (CUDA 12/13): 65536
# 32-bit registers, 2048 resident threads and 32 resident blocks per SM;
# 164 KiB (8.0) / 228 KiB (9.0) shared memory per SM; 1 KiB of shared memory
# reserved by the system per block ("Shared Memory" of the compute
# capability 8.x/9.0 sections); registers allocated per warp in units of 256
# (the CUDA Occupancy Calculator's "register allocation unit size").
SM_LIMITS = {
    'sm_80': dict(registers=65536, threads=2048, blocks=32,
                  shared=164 * 1024),
    'sm_90': dict(registers=65536, threads=2048, blocks=32,
                  shared=228 * 1024),
}
REGISTER_UNIT = 256        # registers, allocated per warp
RESERVED_SHARED = 1024     # bytes per block
WARP = 32
STATIC_SHARED_LIMIT = 48 * 1024   # static __shared__ per block

# (source, kernel: an extern "C" name or a CuPy name expression, threads per
# block of the wrapper's launch)
LAUNCHES = tuple(
    (sparsify.CUDA_SOURCE, name, sparsify.GPU_BLOCK)
    for name in sparsify.KERNELS) + tuple(
    (block_outer.CUDA_SOURCE, name, block_outer.PREPASS_THREADS)
    for name in block_outer.PREPASS_KERNELS) + tuple((block_outer.CUDA_SOURCE, name, threads)
          for name, threads in block_outer.CUDA_KERNELS.values())

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, '
                    r'(\d+) bytes spill loads')
_USED = re.compile(r'Used (\d+) registers')
_SMEM = re.compile(r'(\d+) bytes smem')


def parse_ptxas(text):
    """``{entry name: {'registers', 'stack', 'spill_stores', 'spill_loads',
    'shared'}}`` (ints; bytes except registers) of the entry functions in
    the ``-Xptxas -v`` output ``text``."""
    kernels, current, name, properties_of = {}, None, None, None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            name = entry.group(1)
            current = kernels.setdefault(name, {})
            continue
        properties = _PROPERTIES.search(line)
        if properties:   # the entry's, or a device function's it calls
            properties_of = properties.group(1)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame and properties_of == name:
            current.update(zip(('stack', 'spill_stores', 'spill_loads'),
                               map(int, frame.groups())))
        used = _USED.search(line)
        if used:
            current['registers'] = int(used.group(1))
            smem = _SMEM.search(line)
            current['shared'] = int(smem.group(1)) if smem else 0
            current = None   # the "Used" line ends an entry's report
    return kernels


def measure(nvcc, source, kernel, arch):
    """The ptxas figures (see :func:`parse_ptxas`) of ``kernel`` of the
    ``kernels/`` source ``source`` compiled by ``nvcc`` for ``arch``.
    RuntimeError when the compile fails or reports no such kernel."""
    path = Path(__file__).resolve().with_name(source)
    template = '<' in kernel
    unit = f'#include "{path}"\n' + (
        f'void* instantiation = (void*)&{kernel};\n' if template else '')
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / 'unit.cu').write_text(unit)
        result = subprocess.run(
            [nvcc, '-std=c++17', f'-arch={arch}', '-Xptxas', '-v',
             '--resource-usage', '-c', 'unit.cu', '-o', 'unit.o'],
            capture_output=True, text=True, cwd=folder)
    if result.returncode:
        raise RuntimeError(f'nvcc failed on {kernel}: {result.stderr}')
    kernels = parse_ptxas(result.stdout + result.stderr)
    # the unit's only mangled (C++) entry is the one instantiation
    names = ([name for name in kernels if name.startswith('_Z')] if template
             else [kernel] if kernel in kernels else [])
    if len(names) != 1:
        raise RuntimeError(f'ptxas reported {sorted(kernels)} for {kernel}')
    return kernels[names[0]]


def occupancy(registers, shared, threads, arch):
    """Theoretical occupancy (resident threads / maximum per SM, in [0, 1])
    of blocks of ``threads`` threads using ``registers`` per thread and
    ``shared`` bytes of static shared memory, on ``arch``; and the limiting
    resource ('threads', 'blocks', 'registers' or 'shared')."""
    limits = SM_LIMITS[arch]
    warps = math.ceil(threads / WARP)
    per_warp = math.ceil(registers * WARP / REGISTER_UNIT) * REGISTER_UNIT
    by = {'threads': limits['threads'] // (warps * WARP),
          'blocks': limits['blocks'],
          'registers': (limits['registers'] // per_warp) // warps
          if per_warp else limits['blocks'],
          'shared': limits['shared'] // (shared + RESERVED_SHARED)}
    limit = min(by, key=by.get)
    return by[limit] * warps * WARP / limits['threads'], limit


def table(nvcc):
    """One row per kernel of :data:`LAUNCHES` and arch of :data:`ARCHS`:
    the ptxas figures plus ``source``, ``kernel``, ``arch``, ``threads``,
    ``occupancy`` and ``limited_by``."""
    rows = []
    for source, kernel, threads in LAUNCHES:
        for arch in ARCHS:
            figures = measure(nvcc, source, kernel, arch)
            fraction, limit = occupancy(figures['registers'],
                                        figures['shared'], threads, arch)
            rows.append(dict(source=source, kernel=kernel, arch=arch,
                             threads=threads, **figures,
                             occupancy=fraction, limited_by=limit))
    return rows
