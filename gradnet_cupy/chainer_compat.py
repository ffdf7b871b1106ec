"""The only module that imports Chainer.

Chainer 7.8.1 (its last release) predates NumPy 2 and Python 3.12. At import
time it touches three things that may be gone:

* ``np.sctypes`` (removed in NumPy 2.0), used by ``chainer.functions``;
* ``numpy.distutils`` (absent on NumPy 2 with Python >= 3.12), used by
  Chainer's start-up environment check (only on macOS);
* ``pkg_resources`` (absent without setuptools, and from setuptools 81),
  used by the same check to warn about optional dependency versions.

:func:`_install_shims` puts minimal stand-ins in place, and only where the
real thing is missing, before ``chainer`` is imported.

With CuPy installed, Chainer's CUDA backend imports it (``chainer.backends.
cuda.available`` is True where ``cupy.cuda.cublas`` loads, GPU or not).
CuPy 14 dropped cuDNN (``cupy.cudnn``, ``cupy.cuda.cudnn``): Chainer then
runs with ``cudnn_enabled = False``, and every use of those names is behind
a guard Chainer has (tests/test_chainer_cupy.py audits that; the list is in
bench/results/chainer-cupy-audit.json). No alias is needed (``cupy.util`` is
only Chainer's fallback when ``cupy._util`` is missing). Importing Chainer
there prints two warnings that do not apply: "cuDNN is not enabled. Please
reinstall CuPy after you install cudnn" (no CuPy 14 has cuDNN), and CuPy's
"nccl library could not be loaded" (Chainer's multi-GPU updater imports
``cupy.cuda.nccl``; gradnet_cupy uses no NCCL). :func:`_quiet_cupy_warnings`
silences those two during the import of Chainer, the cuDNN one only where
CuPy has no cuDNN module.

Every other module of gradnet_cupy imports Chainer from here::

    from gradnet_cupy.chainer_compat import chainer, F, L

ChainerMN (``chainermn``, shipped inside the chainer 7.8.1 distribution)
too, but only on demand: :func:`import_chainermn` (``--mpi``; it needs
``mpi4py``, which the ``mpi`` extra installs).
"""
import importlib.util
import sys
import types
import warnings

import numpy as np


def _sctypes():
    return {
        'int': [np.int8, np.int16, np.int32, np.int64],
        'uint': [np.uint8, np.uint16, np.uint32, np.uint64],
        'float': [np.float16, np.float32, np.float64],
        'complex': [np.complex64, np.complex128],
        'others': [bool, object, bytes, str, np.void],
    }


def _stub_numpy_distutils():
    distutils = types.ModuleType('numpy.distutils')
    system_info = types.ModuleType('numpy.distutils.system_info')
    system_info.get_info = lambda name, notfound_action=0: {}
    distutils.system_info = system_info
    return distutils, system_info


def _stub_pkg_resources():
    """Enough of pkg_resources for Chainer's optional-dependency check.

    ``require`` reports every optional dependency as not installed, which only
    skips Chainer's version-mismatch warnings.
    """
    module = types.ModuleType('pkg_resources')

    class ResolutionError(Exception):
        pass

    class DistributionNotFound(ResolutionError):
        pass

    class VersionConflict(ResolutionError):
        pass

    def require(requirement):
        raise DistributionNotFound(requirement)

    module.ResolutionError = ResolutionError
    module.DistributionNotFound = DistributionNotFound
    module.VersionConflict = VersionConflict
    module.require = require
    return module


def _install_shims():
    if 'sctypes' not in np.__dict__:
        np.sctypes = _sctypes()
    try:
        import numpy.distutils.system_info  # noqa: F401
    except ImportError:
        distutils, system_info = _stub_numpy_distutils()
        sys.modules['numpy.distutils'] = distutils
        sys.modules['numpy.distutils.system_info'] = system_info
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules['pkg_resources'] = _stub_pkg_resources()


def _quiet_cupy_warnings():
    """Ignores, in the current warnings context, the two start-up warnings
    that CuPy >= 14 makes Chainer print (see the module docstring)."""
    if importlib.util.find_spec('cupy') is None:
        return
    try:
        has_cudnn = importlib.util.find_spec('cupy.cudnn') is not None
    except Exception:  # a CuPy that fails to import: Chainer reports it
        return
    if not has_cudnn:
        warnings.filterwarnings('ignore', message='cuDNN is not enabled',
                                category=UserWarning)
    warnings.filterwarnings('ignore', message=r'\s*nccl library could not be loaded',
                            category=UserWarning)


with warnings.catch_warnings():
    # numpy.distutils (Python < 3.12) and pkg_resources warn that they are
    # deprecated when imported; Chainer's start-up check imports both.
    # Recent setuptools (80.10.2, pulled in by torch 2.13's
    # setuptools>=77.0.3) warns with a UserWarning instead.
    warnings.simplefilter('ignore', DeprecationWarning)
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                            category=UserWarning)
    _install_shims()
    _quiet_cupy_warnings()
    import chainer
    import chainer.functions as F
    import chainer.links as L



def import_chainermn():
    """The ``chainermn`` module (imported after the shims above, with the
    same start-up warnings quieted). Its communicators import ``mpi4py``
    when created; the caller checks that it is installed."""
    with warnings.catch_warnings():
        _quiet_cupy_warnings()
        import chainermn
    return chainermn


__all__ = ['chainer', 'F', 'L', 'import_chainermn']
