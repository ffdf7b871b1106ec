"""Run CUDA kernel source on the CPU (test tier 4: CI has no GPU).

``EmulatedModule(source)`` compiles the text of a ``.cu`` file with g++
(C++20, after ``cuda_shim.h``) into a shared library together with a
generated launcher per ``__global__`` function, and offers

    module.launch(name, grid, block, shared_mem, args)

with the same meaning as the CuPy launcher of ``gradnet_cupy.kernels._cuda``
but on NumPy arrays, so a kernel wrapper's launch sequence runs unchanged.

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
fail the launch (undefined behaviour in CUDA, often a hang on the GPU).
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = Path(__file__).with_name('cuda_shim.h')
CXX_FLAGS = ('-std=c++20', '-pthread', '-O1', '-fPIC', '-shared',
             '-ffp-contract=off')
PAD = 4096
MAX_THREADS = 1024
MAX_DYNAMIC_SHARED = 48 * 1024

_KERNEL = re.compile(r'(template\s*<[^{};]*>\s*)?__global__\s+void\s+'
                     r'(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')
_EXTERN_SHARED = re.compile(r'extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?'
                            r'([\w\s]*?\w)\s+(\w+)\s*\[\s*\]\s*;')


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
            f'int emu_launch_{symbol}(unsigned gx, unsigned gy, unsigned gz, '
            f'unsigned bx, unsigned by, unsigned bz, size_t shared, '
            f'void** args, char* error, size_t error_size) {{ return '
            f'emu::launch({kernel}, dim3(gx, gy, gz), dim3(bx, by, bz), '
            f'shared, args, error, error_size); }}')
        parts.append(
            f'const char* emu_signature_{symbol}() {{ static const '
            f'std::string s = emu::signature({kernel}); return s.c_str(); }}')
    parts.append('}')
    return '\n'.join(parts) + '\n'


def _build(code, cxx):
    """Compiles ``code`` to a shared library, cached by content."""
    key = hashlib.sha256('\0'.join(
        (code, SHIM.read_text(), cxx) + CXX_FLAGS).encode()).hexdigest()[:24]
    cache = Path(tempfile.gettempdir()) / f'gradnet-cuda-emulation-{os.getuid()}'
    cache.mkdir(exist_ok=True)
    library = cache / f'{key}.so'
    if not library.exists():
        source = cache / f'{key}.{os.getpid()}.cpp'
        source.write_text(code)
        partial = cache / f'{key}.{os.getpid()}.so'
        result = subprocess.run([cxx, *CXX_FLAGS, str(source), '-o', str(partial)],
                                capture_output=True, text=True)
        source.unlink()
        if result.returncode:
            raise EmulationError(f'{cxx} failed:\n{result.stderr}')
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
    template kernel instantiations to offer, e.g. ``['kernel<float, 8>']``.
    """

    def __init__(self, source, filename='kernel.cu', cxx=None,
                 name_expressions=()):
        cxx = cxx or os.environ.get('CXX', 'g++')
        name_expressions = tuple(name_expressions)
        self._library = ctypes.CDLL(str(_build(
            _launcher_source(source, filename, name_expressions), cxx)))
        self.signatures = {}
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
                ctypes.c_char_p, ctypes.c_size_t]

    def launch(self, name, grid, block, shared_mem, args):
        """Runs kernel ``name`` on NumPy arrays and scalars (see module doc)."""
        if name not in self.signatures:
            raise EmulationError(f'no kernel {name!r}; have {sorted(self.signatures)}')
        grid, block = _dims(grid), _dims(block)
        if min(grid) < 1 or min(block) < 1 or np.prod(block) > MAX_THREADS:
            raise EmulationError(f'{name}: invalid configuration grid={grid} block={block}')
        if not 0 <= shared_mem <= MAX_DYNAMIC_SHARED:
            raise EmulationError(f'{name}: {shared_mem} bytes of dynamic shared memory')
        values, padded = self._marshal(name, args)
        pointers = (ctypes.c_void_p * len(values))(
            *(ctypes.addressof(v) if isinstance(v, ctypes.c_void_p) else v.ctypes.data
              for v in values))
        error = ctypes.create_string_buffer(1024)
        if getattr(self._library, f'emu_launch_{self._symbols[name]}')(
                *grid, *block, shared_mem, pointers, error, len(error)):
            raise EmulationError(f'{name}: {error.value.decode()}')
        for position, array in padded:
            array.finish(name, position)

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
