"""NumPy/CuPy choice and device handling.

Every stage takes and returns arrays of one array module: NumPy on the CPU,
CuPy on the GPU. This module decides which one (``--device auto|cpu|gpu``)
and moves arrays across the host boundary.
"""
import numpy as np

from gradnet_cupy.errors import GradnetError

DEVICES = ('auto', 'cpu', 'gpu')


def import_cupy():
    """Return the ``cupy`` module, or None when it is not installed."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gpu_available():
    """True when CuPy is installed and sees at least one CUDA device."""
    cupy = import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, or a broken CUDA install
        return False


def resolve_device(device):
    """Map ``'auto' | 'cpu' | 'gpu'`` to ``'cpu'`` or ``'gpu'``.

    ``auto`` picks the GPU when CuPy is installed and a device is visible.
    Asking for ``gpu`` without one raises :class:`GradnetError`.
    """
    if device not in DEVICES:
        raise GradnetError(
            f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == 'cpu':
        return 'cpu'
    available = gpu_available()
    if device == 'gpu' and not available:
        if import_cupy() is None:
            reason = 'CuPy is not installed (pip install "gradnet-cupy[gpu]")'
        else:
            reason = 'CuPy is installed but no CUDA device is visible'
        raise GradnetError(f'--device gpu was asked for, but {reason}')
    return 'gpu' if available else 'cpu'


def array_module(device):
    """The array module (numpy or cupy) of a resolved device name."""
    if device == 'gpu':
        return import_cupy()
    return np


def get_array_module(*arrays):
    """numpy, or cupy when any of ``arrays`` is a CuPy array."""
    cupy = import_cupy()
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def to_numpy(array):
    """``array`` on the host: a NumPy or CuPy array, or anything
    ``numpy.asarray`` takes (a list, a NumPy scalar).

    The one host copy of the package: a CuPy array is copied from its
    device (``array.get()``, on the current stream); anything else goes
    through ``numpy.asarray``, so a NumPy array comes back as itself.
    """
    if hasattr(type(array), '__cuda_array_interface__'):
        return array.get()
    return np.asarray(array)


def to_device(array, device):
    """``array`` on ``device`` ('cpu' or 'gpu') as that device's array type."""
    if device == 'gpu':
        return import_cupy().asarray(array)
    return to_numpy(array)
