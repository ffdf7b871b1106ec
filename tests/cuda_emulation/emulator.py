"""Run CUDA kernel source on the CPU (test tier 4: CI has no GPU).

``EmulatedModule(source)`` compiles the text of a ``.cu`` file with g++
(C++20, after ``cuda_shim.h``) into a shared library together with a
generated launcher per ``__global__`` function, and offers

    module.launch(name, grid, block, shared_mem, args)

with the same meaning as the CuPy launcher of ``gradnet_cupy.kernels._cuda``
but on NumPy arrays, so a kernel wrapper's launch sequence runs unchanged.

Each launch returns a :class:`GlobalTraffic`, the bytes the kernel read
and wrote in its array arguments (global memory), counted on every load and
store of the compiled code (g++ -fsanitize=thread instrumentation, without
the sanitizer runtime: cuda_shim.h says what the count is exact about).

The one rewrite of the source: ``extern __shared__ T name[];`` (inside a
function) becomes a pointer to the launch's dynamic shared buffer. Plain
kernels are found by the pattern ``__global__ void name(``; template kernels
are launched through ``name_expressions`` (``'kernel<float, 8>'``), as with
``cupy.RawModule``. What the shim emulates and what it leaves out is listed
at the top of cuda_shim.h.

Checks the GPU would not make (each raises :class:`EmulationError` or
TypeError): arguments must match the kernel's parameter types exactly (an
array for a pointer, with the pointee's dtype; a NumPy scalar of the exact
type otherwise: a Python int or float is refused, as its CuPy size is a
guess); arrays must be C-contiguous; writes up to 4 KiB past either end of
an array are detected (the padding is 0xFF bytes, NaN as float, so stray
reads usually show as well); an empty grid, more than 1024 threads or more
than 48 KiB of dynamic shared memory fail as on the GPU; threads of a block
that wait at different __syncthreads(), or return while others wait at one,
fail the launch (undefined behaviour in CUDA, often a hang on the GPU), and
so do warp intrinsics used outside their lockstep rules (cuda_shim.h).

Dynamic shared memory above 48 KiB is opt-in per kernel, as on sm_80 /
sm_90: ``module.set_max_dynamic_shared_size_bytes(name, n)`` is
``cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
n)`` (CuPy: ``kernel.max_dynamic_shared_size_bytes = n``); ``n`` may reach
the architecture's opt-in limit (``arch='sm_80'``: 163 KiB, ``'sm_90'``:
227 KiB, per block), and a launch may then ask for up to ``n`` bytes. The
check covers the dynamic part only: the emulator does not know a kernel's
static shared size, which the GPU adds to the same limit.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

SHIM = Path(__file__).with_name('cuda_shim.h')
# -fsanitize=thread only instruments the loads and stores (the byte counter,
# cuda_shim.h): the library is linked without the sanitizer runtime.
CXX_FLAGS = ('-std=c++20', '-pthread', '-O1', '-fPIC', '-ffp-contract=off',
             '-fsanitize=thread')
LINK_FLAGS = ('-shared', '-pthread')
PAD = 4096
MAX_THREADS = 1024
MAX_DYNAMIC_SHARED = 48 * 1024
MAX_ARRAY_ARGUMENTS = 64  # cuda_shim.h MAX_RANGES
# the largest dynamic shared memory a kernel may opt in to, per block
MAX_DYNAMIC_SHARED_OPT_IN = {'sm_80': 163 * 1024, 'sm_90': 227 * 1024}

_KERNEL = re.compile(r'(template\s*<[^{};]*>\s*)?__global__\s+void\s+'
                     r'(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')
_EXTERN_SHARED = re.compile(r'extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?'
                            r'([\w\s]*?\w)\s+(\w+)\s*\[\s*\]\s*;')


class GlobalTraffic(NamedTuple):
    """Bytes a launch read from and wrote to its array arguments (global
    memory), counted per load and store of the compiled code (exactness:
    cuda_shim.h): ``read``, ``written`` in total, and ``by_argument``
    {argument position: (read, written)} per array argument."""
    read: int
    written: int
    by_argument: dict


class EmulationError(RuntimeError):
    """A kernel misbehaved under emulation (divergent barrier, write out of
    bounds) or was launched with a configuration the GPU refuses."""


def kernel_names(source):
    """Names of the non-template ``__global__`` functions in ``source``, in
    order."""
    return [name for template, name in _KERNEL.findall(source)
            if not template]


def translate(source):
    """``source`` with ``extern __shared__`` arrays made emulator pointers."""
    return _EXTERN_SHARED.sub(
        r'\1* \2 = static_cast<\1*>(emu::dynamic_shared());', source)


def _kernel_symbols(source, name_expressions):
    """{launch name: C identifier of its launcher} for the plain kernels of
    ``source`` and the template instantiations ``name_expressions``."""
    symbols = {name: name for name in kernel_names(source)}
    for i, expression in enumerate(name_expressions):
        symbols[expression] = f'template_{i}'
    return symbols


def _launcher_source(source, filename, name_expressions):
    symbols = _kernel_symbols(source, name_expressions)
    if not symbols:
        raise EmulationError(f'{filename}: no __global__ kernel found')
    parts = [f'#include "{SHIM}"', f'#line 1 "{filename}"', translate(source),
             'extern "C" {']
    for kernel, symbol in symbols.items():
        parts.append(
            f'int emu_launch_{symbol}(unsigned emu_gx, unsigned emu_gy, '
            f'unsigned emu_gz, unsigned emu_bx, unsigned emu_by, unsigned emu_bz, '
            f'size_t emu_shared, void** emu_args, const emu::Range* emu_ranges, '
            f'int emu_range_count, unsigned long long* emu_traffic, '
            f'char* emu_error, size_t emu_error_size) {{ return emu::launch('
            f'{kernel}, dim3(emu_gx, emu_gy, emu_gz), dim3(emu_bx, emu_by, emu_bz), '
            f'emu_shared, emu_args, emu_ranges, emu_range_count, emu_traffic, '
            f'emu_error, emu_error_size); }}')
        parts.append(
            f'const char* emu_signature_{symbol}() {{ static const '
            f'std::string s = emu::signature({kernel}); return s.c_str(); }}')
    parts.append('}')
    return '\n'.join(parts) + '\n'


def _build(code, cxx):
    """Compiles ``code`` to a shared library, cached by content."""
    key = hashlib.sha256('\0'.join(
        (code, SHIM.read_text(), cxx) + CXX_FLAGS + LINK_FLAGS).encode()).hexdigest()[:24]
    cache = Path(tempfile.gettempdir()) / f'gradnet-cuda-emulation-{os.getuid()}'
    cache.mkdir(exist_ok=True)
    library = cache / f'{key}.so'
    if not library.exists():
        source = cache / f'{key}.{os.getpid()}.cpp'
        source.write_text(code)
        objects = cache / f'{key}.{os.getpid()}.o'
        partial = cache / f'{key}.{os.getpid()}.so'
        for command in ([cxx, *CXX_FLAGS, '-c', str(source), '-o', str(objects)],
                        [cxx, *LINK_FLAGS, str(objects), '-o', str(partial)]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                source.unlink()
                objects.unlink(missing_ok=True)
                raise EmulationError(f'{cxx} failed:\n{result.stderr}')
        source.unlink()
        objects.unlink()
        os.replace(partial, library)  # atomic: concurrent builds are safe
    return library


def _dims(value):
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3:
        raise EmulationError(f'grid and block need 1 to 3 dimensions, got {value}')
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _code(dtype):
    return 'b1' if dtype == np.bool_ else f'{dtype.kind}{dtype.itemsize}'


class _PaddedArray:
    """An array copied between two guard zones of 0xFF bytes."""

    def __init__(self, array):
        self.array = array
        self.buffer = np.full(array.nbytes + 2 * PAD, 0xFF, dtype=np.uint8)
        self.buffer[PAD:PAD + array.nbytes] = array.reshape(-1).view(np.uint8)
        self.pointer = ctypes.c_void_p(self.buffer.ctypes.data + PAD)

    def finish(self, kernel, position):
        """Checks the guard zones; copies the kernel's writes back."""
        guards = np.concatenate((self.buffer[:PAD], self.buffer[PAD + self.array.nbytes:]))
        if (guards != 0xFF).any():
            raise EmulationError(f'{kernel}: wrote outside argument {position} '
                                 f'({self.array.dtype}{list(self.array.shape)})')
        inside = self.buffer[PAD:PAD + self.array.nbytes]
        flat = self.array.reshape(-1).view(np.uint8)
        if (flat != inside).any():
            flat[...] = inside


class EmulatedModule:
    """The kernels of one CUDA source, compiled for the CPU.

    source: the .cu text; filename: its name in compiler and barrier
    messages; cxx: the compiler (default $CXX or g++); name_expressions:
    template kernel instantiations to offer, e.g. ``['kernel<float, 8>']``;
    arch: the GPU whose shared memory limits apply (a key of
    MAX_DYNAMIC_SHARED_OPT_IN).
    """

    def __init__(self, source, filename='kernel.cu', cxx=None,
                 name_expressions=(), arch='sm_90'):
        if arch not in MAX_DYNAMIC_SHARED_OPT_IN:
            raise EmulationError(f'unknown arch {arch!r}: choose one of '
                                 f'{", ".join(MAX_DYNAMIC_SHARED_OPT_IN)}')
        self.arch = arch
        cxx = cxx or os.environ.get('CXX', 'g++')
        name_expressions = tuple(name_expressions)
        self._library = ctypes.CDLL(str(_build(
            _launcher_source(source, filename, name_expressions), cxx)))
        self.signatures = {}
        self._max_dynamic_shared = {}
        self._symbols = _kernel_symbols(source, name_expressions)
        for name, symbol in self._symbols.items():
            signature = getattr(self._library, f'emu_signature_{symbol}')
            signature.restype = ctypes.c_char_p
            codes = signature().decode()
            self.signatures[name] = codes.split(',') if codes else []
            launcher = getattr(self._library, f'emu_launch_{symbol}')
            launcher.restype = ctypes.c_int
            launcher.argtypes = [ctypes.c_uint] * 6 + [
                ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong),
                ctypes.c_char_p, ctypes.c_size_t]

    def set_max_dynamic_shared_size_bytes(self, name, nbytes):
        """Lets kernel ``name`` launch with up to ``nbytes`` of dynamic shared
        memory (CUDA's cudaFuncAttributeMaxDynamicSharedMemorySize); at most
        the opt-in limit of ``self.arch``."""
        self._check_name(name)
        limit = MAX_DYNAMIC_SHARED_OPT_IN[self.arch]
        if not 0 <= nbytes <= limit:
            raise EmulationError(f'{name}: max dynamic shared size {nbytes} bytes is '
                                 f'outside [0, {limit}] on {self.arch}')
        self._max_dynamic_shared[name] = int(nbytes)

    def _check_name(self, name):
        if name not in self.signatures:
            raise EmulationError(f'no kernel {name!r}; have {sorted(self.signatures)}')

    def launch(self, name, grid, block, shared_mem, args):
        """Runs kernel ``name`` on NumPy arrays and scalars (see module doc);
        returns its :class:`GlobalTraffic`."""
        self._check_name(name)
        grid, block = _dims(grid), _dims(block)
        if min(grid) < 1 or min(block) < 1 or np.prod(block) > MAX_THREADS:
            raise EmulationError(f'{name}: invalid configuration grid={grid} block={block}')
        allowed = self._max_dynamic_shared.get(name, MAX_DYNAMIC_SHARED)
        if not 0 <= shared_mem <= allowed:
            raise EmulationError(
                f'{name}: {shared_mem} bytes of dynamic shared memory, more than '
                f'{allowed} (above {MAX_DYNAMIC_SHARED} needs '
                'set_max_dynamic_shared_size_bytes)')
        values, padded = self._marshal(name, args)
        pointers = (ctypes.c_void_p * len(values))(
            *(ctypes.addressof(v) if isinstance(v, ctypes.c_void_p) else v.ctypes.data
              for v in values))
        ranges = np.array([(a.buffer.ctypes.data, a.buffer.ctypes.data + a.buffer.nbytes)
                           for _, a in padded], dtype=np.uintp).reshape(-1, 2)
        if len(ranges) > MAX_ARRAY_ARGUMENTS:
            raise EmulationError(f'{name}: more than {MAX_ARRAY_ARGUMENTS} array arguments')
        traffic = np.zeros((len(ranges), 2), dtype=np.uint64)
        error = ctypes.create_string_buffer(1024)
        if getattr(self._library, f'emu_launch_{self._symbols[name]}')(
                *grid, *block, shared_mem, pointers, ranges.ctypes.data, len(ranges),
                traffic.ctypes.data_as(ctypes.POINTER(ctypes.c_ulonglong)), error, len(error)):
            raise EmulationError(f'{name}: {error.value.decode()}')
        for position, array in padded:
            array.finish(name, position)
        by_argument = {position: (int(r), int(w))
                       for (position, _), (r, w) in zip(padded, traffic)}
        return GlobalTraffic(int(traffic[:, 0].sum()), int(traffic[:, 1].sum()),
                             by_argument)

    def _marshal(self, name, args):
        """Kernel argument storage: a c_void_p per array, a 0-d array per
        scalar; and the padded arrays to check after the launch."""
        expected = self.signatures[name]
        if len(args) != len(expected):
            raise TypeError(f'{name} takes {len(expected)} arguments, got {len(args)}')
        values, padded = [], []
        for position, (arg, code) in enumerate(zip(args, expected)):
            if code.endswith('*'):
                if not isinstance(arg, np.ndarray) or _code(arg.dtype) != code[:-1]:
                    raise TypeError(f'{name} argument {position}: expected a '
                                    f'{code[:-1]} array, got {_describe(arg)}')
                if not arg.flags.c_contiguous:
                    raise TypeError(f'{name} argument {position}: array is not C-contiguous')
                array = _PaddedArray(arg)
                padded.append((position, array))
                values.append(array.pointer)
            else:
                if not isinstance(arg, np.generic) or _code(arg.dtype) != code:
                    raise TypeError(f'{name} argument {position}: expected a '
                                    f'NumPy {code} scalar, got {_describe(arg)}')
                values.append(np.array(arg))
        return values, padded


def _describe(arg):
    if isinstance(arg, (np.ndarray, np.generic)):
        return f'{type(arg).__name__} of {_code(arg.dtype)}'
    return type(arg).__name__
