"""Loading this package's CUDA sources (``kernels/*.cu``) into CuPy.

A kernel wrapper asks for a *launch* callable::

    launch = launcher('sparsify.cu')
    launch('percentile_select', grid, block, shared_mem, args)

which runs a kernel of that source on the current CuPy device and the current
CuPy stream (wrap the calls in ``with stream:`` to honour a ``stream=``
argument). The CPU emulation in ``tests/cuda_emulation`` offers the same
callable, so a wrapper's launch sequence runs unchanged on both.

Caching: this module keeps no cache of compiled modules; CuPy's is enough.
A ``cupy.RawModule`` compiles on first use, and CuPy memoizes the loaded
module per device, keyed by the source text, the options and the name
expressions (``_get_raw_module`` in ``cupy/_core/raw.pyx`` is
``memoize(for_each_device=True)``, CuPy >= 8), on top of the compiled
binaries it keeps on disk (``~/.cupy/kernel_cache``). So the fresh
``RawModule`` that every :func:`launcher` call makes finds the module already
loaded on its device, and a source is compiled (or read from the disk cache)
once per (source, options, name expressions, device), the key of the
module dict this file used to keep beside CuPy's. Only the source text is
cached here (:func:`read_source` reads each file once per process).
"""
import functools
import importlib.resources

DEFAULT_OPTIONS = ('-std=c++17',)


@functools.lru_cache(maxsize=None)
def read_source(filename):
    """The text of the CUDA source ``filename`` shipped in this package."""
    resource = importlib.resources.files('gradnet_cupy.kernels') / filename
    return resource.read_text(encoding='utf-8')


def raw_module(filename, options=DEFAULT_OPTIONS, name_expressions=None):
    """A ``cupy.RawModule`` of the CUDA source ``filename`` (compiled and
    loaded by CuPy on first use per device, see the module docstring)."""
    import cupy

    if name_expressions is not None:
        name_expressions = tuple(name_expressions)
    return cupy.RawModule(code=read_source(filename), options=tuple(options),
                          name_expressions=name_expressions)


def launcher(filename, options=DEFAULT_OPTIONS, name_expressions=None):
    """A ``launch(name, grid, block, shared_mem, args)`` callable for the
    kernels of ``filename`` (compiled once per device).

    ``name`` is an ``extern "C"`` kernel name or one of ``name_expressions``
    (template instantiations); ``grid`` and ``block`` are int tuples;
    ``args`` are CuPy arrays and NumPy scalars of the kernel's exact types.
    """
    module = raw_module(filename, options, name_expressions)

    def launch(name, grid, block, shared_mem, args):
        kernel = module.get_function(name)
        kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)

    return launch
