"""The three tiers a kernel test runs on, behind one ``backend`` fixture.

In the style of ``cupy.testing`` (``numpy_cupy_allclose`` injects the array
module), a kernel test is written once and takes a :class:`KernelBackend`,
which runs the kernels on one tier:

``numpy``
    the NumPy reference: the public functions on NumPy arrays;
``emulated``
    the CUDA source run on the CPU by tests/cuda_emulation, through the
    wrapper's own launch sequence (``sparsify_launch_sequence``,
    ``sparse_launch``) on NumPy arrays; needs g++ (skipped without, failed
    when CI is set);
``cupy``
    the public functions on CuPy arrays on a GPU; skipped without CuPy and a
    CUDA device.

A backend's kernel methods take host (NumPy) inputs, move them to the tier,
run the kernel, check that the result is an array of the tier's module and
return it on the host, so a test compares every tier with its oracle and with
the NumPy reference by plain NumPy assertions.

tests/conftest.py parametrizes each test that asks for ``backend`` over
:data:`BACKENDS`. ``@pytest.mark.backends('numpy', 'cupy')`` keeps a test to
some tiers (a case too large for the emulator, a path without CUDA source);
:func:`per_tier` gives each tier its own values of a parameter (the case
sizes each tier affords).
"""
import os

import numpy as np
import pytest

from gradnet_cupy.backend import gpu_available, import_cupy, to_numpy
from gradnet_cupy.kernels import CSR, block_outer_accumulate, percentile_sparsify
from gradnet_cupy.kernels.block_outer import (CUDA_NAME_EXPRESSIONS,
                                              CUDA_SOURCE, sparse_launch)
from gradnet_cupy.kernels.sparsify import (SAMPLE_KEYS, check_q,
                                           segment_offsets,
                                           sparsify_launch_sequence)

BACKENDS = ('numpy', 'emulated', 'cupy')
SPARSIFY_SOURCE = 'sparsify.cu'
EMULATED_BLOCK = 32  # threads per block of an emulated sparsify launch
# the longest segment an emulated sparsify launch stages whole: longer ones
# take the sampled path (sample, split, resolve, fallback), so that small
# cases reach it
EMULATED_SAMPLE_KEYS = 64


class KernelBackend:
    """One tier: ``name`` (one of BACKENDS) and ``xp``, the array module its
    kernels take (NumPy for 'numpy' and 'emulated', CuPy for 'cupy')."""
    name = None
    xp = np

    def array(self, host):
        """The host array ``host`` as an array of the tier."""
        return self.xp.asarray(host)

    def csr(self, host):
        """The host :class:`CSR` ``host`` with its arrays on the tier."""
        return CSR(*(self.array(a) for a in host[:3]), tuple(host.shape))

    def host(self, array):
        """A result of the tier (checked to be one) on the host."""
        assert isinstance(array, self.xp.ndarray), (self.name, type(array))
        return to_numpy(array)

    def host_csr(self, csr):
        """A CSR result of the tier on the host."""
        return CSR(*(self.host(a) for a in csr[:3]), tuple(csr.shape))

    def percentile_sparsify(self, g, sizes, q=85.0, block=None):
        """percentile_sparsify of host g (rows, n) float32 on this tier, as a
        host CSR. ``block``: threads per block of the CUDA launches (the
        CUDA tiers; the NumPy reference has none)."""
        return self.host_csr(self._sparsify(self.array(g), sizes, q, block))

    def block_outer(self, csr, blocks, G, weights=None, method='sparse'):
        """block_outer_accumulate on this tier, starting from a copy of the
        host packed blocks ``G``; returns the sums on the host."""
        w = None if weights is None else self.array(weights)
        return self.host(self._accumulate(self.csr(csr), blocks,
                                          self.xp.array(G), w, method))

    def sparse_kernel(self, csr, blocks, G, weights, selected):
        """The CUDA kernel of block_outer.cu on the ``selected`` blocks (bool
        (k,)) only, through the wrapper's ``sparse_launch``; ``weights``
        float32 (rows,). CUDA tiers only."""
        return self.host(self._sparse_kernel(
            self.csr(csr), blocks, self.xp.array(G), self.array(weights),
            selected))

    def launch_sequence(self, g, sizes, q, block, sample_keys=SAMPLE_KEYS):
        """The CUDA path of percentile_sparsify on this tier's launcher
        (``sample_keys``: see sparsify_launches)."""
        return sparsify_launch_sequence(
            g, segment_offsets(sizes, g.shape[1]), check_q(q) / 100.0,
            self.launcher(SPARSIFY_SOURCE), self.xp, block, sample_keys)

    def launcher(self, filename, name_expressions=()):
        """``launch(name, grid, block, shared_mem, args)`` for the kernels of
        the CUDA source ``filename`` (the CUDA tiers)."""
        raise NotImplementedError(f'the {self.name} tier runs no CUDA source')

    def _sparse_kernel(self, csr, blocks, G, w, selected):
        sparse_launch(self.launcher(CUDA_SOURCE, CUDA_NAME_EXPRESSIONS),
                      csr, blocks, G, w, selected)
        return G

    def _sparsify(self, g, sizes, q, block):
        return percentile_sparsify(g, sizes, q)

    def _accumulate(self, csr, blocks, G, weights, method):
        return block_outer_accumulate(csr, blocks, G, weights, method=method)


class NumpyBackend(KernelBackend):
    name = 'numpy'


class EmulatedBackend(KernelBackend):
    name = 'emulated'

    def launcher(self, filename, name_expressions=()):
        from cuda_emulation import package_module

        return package_module(filename, tuple(name_expressions)).launch

    def _sparsify(self, g, sizes, q, block):
        return self.launch_sequence(g, sizes, q, block or EMULATED_BLOCK,
                                    EMULATED_SAMPLE_KEYS)

    def _accumulate(self, csr, blocks, G, weights, method):
        if method != 'sparse':
            raise ValueError('the emulated tier runs the CUDA kernel, the '
                             "'sparse' method, only")
        w = np.ones(csr.shape[0], np.float32) if weights is None else weights
        return self._sparse_kernel(csr, blocks, G, w,
                                   np.ones(len(blocks), dtype=bool))


class CupyBackend(KernelBackend):
    name = 'cupy'

    def __init__(self):
        self.xp = import_cupy()

    def launcher(self, filename, name_expressions=()):
        from gradnet_cupy.kernels._cuda import launcher

        return launcher(filename, name_expressions=name_expressions or None)

    def _sparsify(self, g, sizes, q, block):
        if block is None:
            return percentile_sparsify(g, sizes, q)
        return self.launch_sequence(g, sizes, q, block)


def make_backend(name):
    """The :class:`KernelBackend` of tier ``name``; skips the test when the
    tier cannot run here."""
    if name == 'cupy' and not gpu_available():
        pytest.skip('needs CuPy and a CUDA device')
    if name == 'emulated':
        from cuda_emulation import require_tool

        require_tool(os.environ.get('CXX', 'g++'))
    return {'numpy': NumpyBackend, 'emulated': EmulatedBackend,
            'cupy': CupyBackend}[name]()


def per_tier(**values):
    """Parameters ``(backend, value)`` giving each tier its own values, for
    ``@pytest.mark.parametrize('backend, name', per_tier(numpy=[...],
    emulated=[...], cupy=[...]), indirect=['backend'])``; a tier left out
    runs none."""
    unknown = set(values) - set(BACKENDS)
    assert not unknown, f'unknown tiers {unknown}'

    def label(value):
        parts = value if isinstance(value, tuple) else (value,)
        return '-'.join(map(str, parts))

    return [pytest.param(tier, value, id=f'{tier}-{label(value)}')
            for tier, tier_values in values.items() for value in tier_values]
