"""Loading this package's CUDA sources (``kernels/*.cu``) into CuPy.

A kernel wrapper asks for a *launch* callable::

    launch = launcher('sparsify.cu')
    launch('percentile_select', grid, block, shared_mem, args)

which runs a kernel of that source on the current CuPy device and the current
CuPy stream (wrap the calls in ``with stream:`` to honour a ``stream=``
argument). The CPU emulation in ``tests/cuda_emulation`` offers the same
callable, so a wrapper's launch sequence runs unchanged on both.

The only state is the cache of compiled modules, one per (source, options,
name expressions, device).
"""
import importlib.resources

_MODULES = {}


def read_source(filename):
    """The text of the CUDA source ``filename`` shipped in this package."""
    resource = importlib.resources.files('gradnet_cupy.kernels') / filename
    return resource.read_text(encoding='utf-8')


def _module(filename, options, name_expressions):
    import cupy

    key = (filename, options, name_expressions, cupy.cuda.Device().id)
    module = _MODULES.get(key)
    if module is None:
        module = cupy.RawModule(code=read_source(filename), options=options,
                                name_expressions=name_expressions)
        _MODULES[key] = module
    return module


def launcher(filename, options=('-std=c++17',), name_expressions=None):
    """A ``launch(name, grid, block, shared_mem, args)`` callable for the
    kernels of ``filename`` (compiled once per device).

    ``name`` is an ``extern "C"`` kernel name or one of ``name_expressions``
    (template instantiations); ``grid`` and ``block`` are int tuples;
    ``args`` are CuPy arrays and NumPy scalars of the kernel's exact types.
    """
    if name_expressions is not None:
        name_expressions = tuple(name_expressions)
    module = _module(filename, tuple(options), name_expressions)

    def launch(name, grid, block, shared_mem, args):
        kernel = module.get_function(name)
        kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)

    return launch
