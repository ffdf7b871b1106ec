"""CUDA kernels with NumPy references, installed as ``gradnet_cupy.kernels``.

Each public function accepts NumPy or CuPy arrays: CuPy input runs the CUDA
kernel (source in this package's ``*.cu`` files), NumPy input runs the NumPy
reference, which is the kernel's executable specification.

Where this package lives: the top-level ``kernels/`` folder of the
repository *is* ``gradnet_cupy.kernels``; ``setup.py`` maps it there
(``package_dir={'gradnet_cupy.kernels': 'kernels'}``) and ships the ``*.cu``
sources and the crossover table as package data, which the wrappers read
through ``importlib.resources``. So the package imports only once installed:
in a checkout run ``pip install -e .`` (an editable install points
``gradnet_cupy.kernels`` at this folder); with only the checkout on
``sys.path``, ``import gradnet_cupy.kernels`` fails. tests/test_kernels_import.py
checks the mapping from a fresh interpreter.

Modules: ``csr`` (the CSR batch and its one check), ``sparsify``
(percentile sparsification, ``sparsify.cu``), ``blocks`` (diagonal block
ranges), ``block_outer`` (block outer-product sums, ``block_outer.cu``) and
``_cuda`` (loads the ``.cu`` sources into CuPy, caches small device
constants) and ``_resources`` (ptxas resource use and occupancy of the
kernels, for tests/test_kernel_resources.py and bench/kernel_resources.py).
"""
from gradnet_cupy.kernels.block_outer import block_outer_accumulate
from gradnet_cupy.kernels.blocks import Blocks
from gradnet_cupy.kernels.csr import CSR
from gradnet_cupy.kernels.sparsify import (fixed_index_sets, gather_fixed,
                                           percentile_sparsify,
                                           percentile_sparsify_async)

__all__ = ['CSR', 'Blocks', 'block_outer_accumulate', 'fixed_index_sets',
           'gather_fixed', 'percentile_sparsify', 'percentile_sparsify_async']
