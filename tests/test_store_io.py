"""Reading the tangent store fast and safely: the Blosc2 compressions read
by plain h5py + hdf5plugin, the prefetching reader (same batches, errors
handed on, clean shutdown), and bad storage settings or a full disk at
finalize."""
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.store import (DEFAULT_COMPRESSION, JOURNAL_SUFFIX,
                                TMP_SUFFIX, StoreWriter, TangentStore)
from gradnet_cupy.store.prefetch import prefetch
from test_store import (LAYOUT, N_COLUMNS, PROVENANCE, ROWS_SOURCE,
                        make_rows, scipy_rows, write_store)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == 'gradnet-prefetch']


@pytest.mark.parametrize('compression', ['blosc2-zstd', 'blosc2-lz4'])
def test_plain_h5py_with_hdf5plugin_reads_a_blosc2_store(tmp_path,
                                                         compression):
    """What docs/store.rst tells an h5py or AnnData user: ``import
    hdf5plugin``, then read; a fresh interpreter without gradnet_cupy."""
    path = write_store(tmp_path / 's.h5', [0, 20, 45], compression)
    script = textwrap.dedent('''
        import sys
        import h5py, hdf5plugin, numpy as np, scipy.sparse
        with h5py.File(sys.argv[1], 'r') as f:
            X = f['X']
            m = scipy.sparse.csr_matrix(
                (X['data'][:], X['indices'][:], X['indptr'][:]),
                shape=tuple(X.attrs['shape']))
        np.savez(sys.argv[2], indptr=m.indptr, indices=m.indices,
                 data=m.data)
        print('gradnet_cupy' in sys.modules)
    ''')
    out = tmp_path / 'read.npz'
    run = subprocess.run([sys.executable, '-c', script, str(path), str(out)],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == 'False'
    expected = scipy_rows(0, 45)
    with np.load(out) as read:
        np.testing.assert_array_equal(read['indptr'], expected.indptr)
        np.testing.assert_array_equal(read['indices'], expected.indices)
        np.testing.assert_array_equal(read['data'], expected.data)


def test_default_compression_is_blosc2_and_recorded(tmp_path):
    writer = StoreWriter.create(tmp_path / 'd.h5', N_COLUMNS, LAYOUT,
                                PROVENANCE, total_rows=5)
    writer.append(*make_rows(0, 5, N_COLUMNS))
    with TangentStore.open(writer.finalize()) as store:
        assert store.storage['compression'] == DEFAULT_COMPRESSION \
            == 'blosc2-zstd'
        np.testing.assert_array_equal(store.read(0, 5).csr.data,
                                      scipy_rows(0, 5).data)


def test_unknown_compression_is_one_line_error(tmp_path):
    with pytest.raises(GradnetError) as info:
        StoreWriter.create(tmp_path / 'u.h5', N_COLUMNS, LAYOUT, PROVENANCE,
                           compression='snappy')
    message = str(info.value)
    assert '\n' not in message and "'snappy'" in message \
        and 'blosc2-zstd' in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('options', [
    {}, {'shuffle': True, 'seed': 3},
    {'shuffle': True, 'seed': 5, 'group_by_sample': True},
    {'group_by_sample': True}])
def test_prefetch_gives_the_same_batches_in_the_same_order(tmp_path,
                                                           options):
    path = write_store(tmp_path / 'p.h5', [0, 17, 40, 61])
    with TangentStore.open(path) as store:
        plain = list(store.iter_batches(4, **options))
        ahead = list(store.iter_batches(4, prefetch=2, **options))
    assert len(plain) == len(ahead) > 5
    for a, b in zip(plain, ahead):
        for name in ('indptr', 'indices', 'data'):
            np.testing.assert_array_equal(getattr(a.csr, name),
                                          getattr(b.csr, name))
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)
    assert not prefetch_threads()


def test_read_rows_in_any_order_with_repeats(tmp_path):
    """Runs of consecutive rows in the requested order, backwards runs and
    repeats all come back in the requested order."""
    path = write_store(tmp_path / 'r.h5', [0, 30, 60])
    rows = np.array([5, 6, 7, 3, 2, 59, 0, 6, 6, 7, 31, 30, 29])
    expected = scipy_rows(0, 60)[rows]
    with TangentStore.open(path) as store:
        batch = store.read_rows(rows)
        empty = store.read_rows(np.zeros(0, np.int64))
    assert (batch.csr.to_scipy() != expected).nnz == 0
    np.testing.assert_array_equal(batch.csr.indptr, expected.indptr)
    np.testing.assert_array_equal(batch.sample, rows // 3)
    assert empty.csr.shape == (0, N_COLUMNS) and empty.sample.size == 0


def test_prefetch_hands_on_the_error_after_the_items_before_it():
    def source():
        yield from range(3)
        raise ValueError('chunk 3 is corrupt')

    got = []
    with pytest.raises(ValueError, match='chunk 3 is corrupt'):
        for item in prefetch(source(), 2):
            got.append(item)
    assert got == [0, 1, 2]
    assert not prefetch_threads()


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    produced, closed = [], []

    def source():
        try:
            for item in range(1000):
                produced.append(item)
                yield item
        finally:
            closed.append(True)

    items = prefetch(source(), 3)
    assert [next(items) for _ in range(4)] == [0, 1, 2, 3]
    items.close()
    assert not prefetch_threads() and closed == [True]
    # it ran at most depth + 1 items ahead of the consumer, then stopped
    assert len(produced) <= 4 + 3 + 1


def test_prefetch_refuses_a_bad_depth():
    with pytest.raises(GradnetError, match='prefetch depth'):
        list(prefetch(range(3), 0))


FULL_DISK_SCRIPT = ROWS_SOURCE + textwrap.dedent('''
    import resource, signal, sys
    from gradnet_cupy.errors import GradnetError
    from gradnet_cupy.store import StoreWriter

    path, limit = sys.argv[1], int(sys.argv[2])
    writer = StoreWriter.create(path, 700, {}, {'run': 'full disk'},
                                total_rows=60, compression='none')
    for start in (0, 20, 40):
        writer.append(*make_rows(start, start + 20, 700))
    # from here on no file may grow past `limit` bytes (``ulimit -f``)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        writer.finalize()
    except GradnetError as error:
        print(error)
    else:
        print('finalized')
''')


def check_nothing_half_written_then_finalize(path):
    """No store, no temporary file; the journal resumes and finalizes."""
    assert not path.exists()
    assert not path.with_name(path.name + TMP_SUFFIX).exists()
    assert path.with_name(path.name + JOURNAL_SUFFIX).exists()
    writer, done = StoreWriter.resume(path, {'run': 'full disk'})
    assert done == 60
    with TangentStore.open(writer.finalize()) as store:
        assert (store.read(0, 60).csr.to_scipy()
                != scipy_rows(0, 60)).nnz == 0


def test_finalize_over_the_file_size_limit_is_refused_cleanly(tmp_path):
    path = tmp_path / 'full.h5'
    run = subprocess.run(
        [sys.executable, '-c', FULL_DISK_SCRIPT, str(path), str(40_000)],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    message = run.stdout.strip()
    assert '\n' not in message and 'not enough room' in message \
        and 'file size limit is 0.0 MB' in message
    check_nothing_half_written_then_finalize(path)


def test_finalize_on_a_full_disk_is_refused_cleanly(tmp_path, monkeypatch):
    path = tmp_path / 'full.h5'
    writer = StoreWriter.create(path, N_COLUMNS, {}, {'run': 'full disk'},
                                total_rows=60)
    for start in (0, 20, 40):
        writer.append(*make_rows(start, start + 20, N_COLUMNS))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage',
                        lambda where: usage._replace(free=300_000))
    with pytest.raises(GradnetError, match=r'not enough room.*0\.3 MB free'):
        writer.finalize()
    writer.close()
    monkeypatch.undo()
    check_nothing_half_written_then_finalize(path)
