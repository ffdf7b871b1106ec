"""CUDA kernels with NumPy references, installed as ``gradnet_cupy.kernels``.

Each public function accepts NumPy or CuPy arrays: CuPy input runs the CUDA
kernel (source in this package's ``*.cu`` files), NumPy input runs the NumPy
reference, which is the kernel's executable specification.
"""
from gradnet_cupy.kernels.block_outer import block_outer_accumulate
from gradnet_cupy.kernels.blocks import Blocks
from gradnet_cupy.kernels.csr import CSR
from gradnet_cupy.kernels.sparsify import (fixed_index_sets, gather_fixed,
                                           percentile_sparsify)

__all__ = ['CSR', 'Blocks', 'block_outer_accumulate', 'fixed_index_sets',
           'gather_fixed', 'percentile_sparsify']
