"""CPU emulation of CUDA kernels (test tier 4, see emulator.py), and the
compiler check shared by the tests that need one."""
import functools
import os
import shutil

import pytest

from .emulator import EmulatedModule, EmulationError, kernel_names

__all__ = ['EmulatedModule', 'EmulationError', 'kernel_names',
           'package_module', 'require_tool']


def require_tool(name):
    """The path of the executable ``name``. Without it the calling test
    fails when the environment variable CI is set, and is skipped
    otherwise."""
    path = shutil.which(name)
    if path is None:
        message = f'{name} is not on PATH'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
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
