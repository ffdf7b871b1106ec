"""CPU emulation of CUDA kernels (test tier 4, see emulator.py), and the
compiler check shared by the tests that need one."""
import functools
import os
import shutil

import pytest

from .emulator import EmulatedModule, EmulationError, GlobalTraffic, kernel_names

__all__ = ['EmulatedModule', 'EmulationError', 'GlobalTraffic', 'kernel_names',
           'package_module', 'require_tool', 'skip_or_fail']


def skip_or_fail(reason):
    """Fails the calling test when the environment variable CI is set (CI
    must run every tier), skips it otherwise."""
    if os.environ.get('CI'):
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(name):
    """The path of the executable ``name``; without it, skip_or_fail."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f'{name} is not on PATH')
    return path


@functools.lru_cache(maxsize=None)
def package_module(filename, name_expressions=()):
    """The :class:`EmulatedModule` of the CUDA source ``filename`` shipped in
    gradnet_cupy.kernels, read exactly as the CuPy loader reads it, with the
    template instantiations ``name_expressions`` (a tuple; compiled once per
    process)."""
    from gradnet_cupy.kernels._cuda import read_source

    require_tool(os.environ.get('CXX', 'g++'))
    return EmulatedModule(read_source(filename), filename,
                          name_expressions=name_expressions)
