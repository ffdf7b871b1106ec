"""The store takes CuPy batches (the host copy happens in append)."""
import numpy as np
import pytest

from gradnet_cupy.kernels import CSR
from gradnet_cupy.store import StoreWriter, TangentStore

cupy = pytest.importorskip('cupy')


def test_append_cupy_batch_reads_back_equal(tmp_path, rng):
    dense = rng.standard_normal((6, 50)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.7] = 0
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=6))])
    gpu = CSR(cupy.asarray(indptr, dtype=cupy.int64),
              cupy.asarray(cols, dtype=cupy.int32),
              cupy.asarray(dense[rows, cols]), (6, 50))
    writer = StoreWriter.create(tmp_path / 'g.h5', 50, {}, {'seed': 0})
    writer.append(gpu, cupy.arange(6), cupy.zeros(6, cupy.int16),
                  cupy.ones(6, cupy.int16))
    with TangentStore.open(writer.finalize()) as store:
        batch = store.read(0, 6)
    np.testing.assert_array_equal(batch.csr.to_scipy().toarray(), dense)
    np.testing.assert_array_equal(batch.sample, np.arange(6))
    assert isinstance(batch.csr.data, np.ndarray)
