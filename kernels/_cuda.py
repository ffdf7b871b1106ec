"""Loading this package's CUDA sources (``kernels/*.cu``) into CuPy.

A kernel wrapper asks for a *launch* callable::

    launch = launcher('sparsify.cu')
    launch('sparsify_sample', grid, block, shared_mem, args)

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

Small host-built index arrays (segment offsets, tile lists, block ranges) go
to the device through :func:`device_constants`, which keeps one read-only
copy per (content, device): the first request uploads it and waits for the
copy (one host wait, so that any stream may read it afterwards), later ones
reuse it without a host-to-device copy. That is what makes a wrapper
capturable in a CUDA graph after one warm-up call: a capture may not wait
for the host, and a copy from a pinned staging buffer that CuPy recycles
would be replayed from stale memory.
"""
import collections
import functools
import importlib.resources
import threading

import numpy as np

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


DEVICE_CONSTANTS = 256   # cached device copies (least recently used dropped)
_constants = collections.OrderedDict()
_constants_lock = threading.Lock()


def device_constants(hosts, xp):
    """Device copies of the NumPy arrays ``hosts`` as arrays of module
    ``xp`` (the arrays themselves when ``xp`` is NumPy), each shared by
    every caller with equal content on the current device: never write to
    them.

    The contents not yet on the device are copied on the current stream,
    followed by one wait for that stream (one host wait per call that
    uploads anything); cached contents are returned without touching a
    stream.
    """
    hosts = [np.ascontiguousarray(host) for host in hosts]
    if xp is np:
        return hosts
    device = xp.cuda.Device().id
    keys = [(device, host.dtype.str, host.shape, host.tobytes())
            for host in hosts]
    with _constants_lock:
        found = [_constants.get(key) for key in keys]
    if any(array is None for array in found):
        found = [xp.asarray(host) if array is None else array
                 for host, array in zip(hosts, found)]
        xp.cuda.get_current_stream().synchronize()
    with _constants_lock:
        for key, array in zip(keys, found):
            _constants[key] = array
            _constants.move_to_end(key)
        while len(_constants) > DEVICE_CONSTANTS:
            _constants.popitem(last=False)
    return found


def device_constant(host, xp):
    """:func:`device_constants` of one array."""
    return device_constants([host], xp)[0]
