"""The HDF5 tangent store: round trips, interoperability, statistics, crash
safety (a real subprocess killed with SIGKILL), refusals and shard merging."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import scipy.sparse

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import CSR
from gradnet_cupy.store import (COMPRESSIONS, JOURNAL_SUFFIX, StoreWriter,
                                TangentStore, file_sha256, merge)
from gradnet_cupy.store.format import _scan_journal

N_COLUMNS = 700
LAYOUT = {'links': ['c1', 'c2', 'fc'], 'shapes': [[4, 1, 5, 5], [6, 4, 5, 5],
                                                  [10, 10]],
          'block_sizes': [100, 500, 100]}
PROVENANCE = {'model_sha256': 'ab' * 32, 'dataset': 'mnist',
              'split': 'gradnet', 'q': 85, 'candidates': 'random', 'seed': 0}

# Deterministic rows, shared by the crash-test subprocess and these tests.
ROWS_SOURCE = textwrap.dedent('''
    import numpy as np
    from gradnet_cupy.kernels import CSR

    def make_rows(start, stop, n_columns):
        """Rows start:stop: CSR with ~30% density (some rows empty),
        log-normal magnitudes, random signs; sample = row // 3 (three
        candidates per sample), candidate = row % 3, target = sample % 10."""
        indptr, indices, data = [0], [], []
        for row in range(start, stop):
            rng = np.random.default_rng(1000 + row)
            keep = rng.random(n_columns) < (0.0 if row % 11 == 5 else 0.3)
            cols = np.flatnonzero(keep).astype(np.int32)
            values = rng.lognormal(-3, 1.5, cols.size) * rng.choice(
                [-1, 1], cols.size)
            indices.append(cols)
            data.append(values.astype(np.float32))
            indptr.append(indptr[-1] + cols.size)
        rows = np.arange(start, stop)
        csr = CSR(np.array(indptr, np.int64),
                  np.concatenate([np.zeros(0, np.int32)] + indices),
                  np.concatenate([np.zeros(0, np.float32)] + data),
                  (stop - start, n_columns))
        return csr, rows // 3, rows % 3, (rows // 3) % 10
''')
_namespace = {}
exec(ROWS_SOURCE, _namespace)
make_rows = _namespace['make_rows']


def scipy_rows(start, stop):
    return make_rows(start, stop, N_COLUMNS)[0].to_scipy()


def write_store(path, bounds, compression='gzip', provenance=PROVENANCE,
                chunk_elements=1000):
    """A finalized store of rows bounds[0]:bounds[-1], appended in batches
    bounds[k]:bounds[k + 1]."""
    writer = StoreWriter.create(path, N_COLUMNS, LAYOUT, provenance,
                                total_rows=bounds[-1] - bounds[0],
                                compression=compression,
                                chunk_elements=chunk_elements)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        writer.append(*make_rows(start, stop, N_COLUMNS))
    return writer.finalize()


def assert_same_csr(csr, expected):
    """``csr`` (our CSR) equals the scipy matrix ``expected`` exactly."""
    assert csr.shape == expected.shape
    np.testing.assert_array_equal(csr.indptr, expected.indptr)
    np.testing.assert_array_equal(csr.indices, expected.indices)
    np.testing.assert_array_equal(csr.data, expected.data)
    assert csr.indptr.dtype == np.int64 and csr.indices.dtype == np.int32 \
        and csr.data.dtype == np.float32


@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path / 'tangents.h5', [0, 7, 30, 31, 60, 90])


@pytest.mark.parametrize('compression', COMPRESSIONS)
def test_round_trip_equals_scipy(tmp_path, compression):
    path = write_store(tmp_path / 's.h5', [0, 13, 13, 40, 75], compression)
    expected = scipy_rows(0, 75)
    with TangentStore.open(path) as store:
        assert len(store) == 75 and store.shape == (75, N_COLUMNS)
        assert store.nnz == expected.nnz and store.complete
        assert store.layout == LAYOUT
        assert {k: store.provenance[k] for k in PROVENANCE} == PROVENANCE
        assert store.provenance['package_version'] == '0.1.0'
        assert store.storage['compression'] == compression
        csr, sample, candidate, target = store.read(0, 75)
    assert_same_csr(csr, expected)
    rows = np.arange(75)
    np.testing.assert_array_equal(sample, rows // 3)
    np.testing.assert_array_equal(candidate, rows % 3)
    np.testing.assert_array_equal(target, (rows // 3) % 10)
    assert (sample.dtype, candidate.dtype, target.dtype) == (
        np.int64, np.int16, np.int16)


def test_plain_h5py_and_scipy_read_the_store(store_path):
    """Another tool needs nothing of gradnet_cupy to read the matrix."""
    with h5py.File(store_path, 'r') as f:
        group = f['X']
        assert group.attrs['encoding-type'] == 'csr_matrix'
        assert group.attrs['encoding-version'] == '0.1.0'
        matrix = scipy.sparse.csr_matrix(
            (group['data'][:], group['indices'][:], group['indptr'][:]),
            shape=tuple(group.attrs['shape']))
        sample = f['sample'][:]
        provenance = json.loads(f.attrs['provenance'])
    expected = scipy_rows(0, 90)
    assert matrix.shape == expected.shape
    assert (matrix != expected).nnz == 0
    np.testing.assert_array_equal(sample, np.arange(90) // 3)
    assert provenance['q'] == 85


def test_anndata_reads_the_csr_group(store_path):
    from anndata.io import read_elem
    with h5py.File(store_path, 'r') as f:
        matrix = read_elem(f['X'])
    expected = scipy_rows(0, 90)
    assert scipy.sparse.issparse(matrix) and matrix.format == 'csr'
    assert matrix.shape == expected.shape and matrix.dtype == np.float32
    assert (matrix != expected).nnz == 0


def test_read_slices_and_row_lists(store_path):
    expected = scipy_rows(0, 90)
    with TangentStore.open(store_path) as store:
        for start, stop in [(0, 1), (5, 31), (30, 31), (89, 90), (40, 40)]:
            batch = store.read(start, stop)
            assert_same_csr(batch.csr, expected[start:stop])
            np.testing.assert_array_equal(batch.sample,
                                          np.arange(start, stop) // 3)
        for rows in ([71, 3, 4, 5, 3, 89, 0], [10, 11, 12], [5], []):
            batch = store.read_rows(np.array(rows, dtype=np.int64))
            assert_same_csr(batch.csr, expected[rows])
            np.testing.assert_array_equal(batch.candidate,
                                          np.array(rows, np.int64) % 3)
        batch = store.read(0, 3)
        batch.sample[:] = -1                  # a copy, not the store's
        assert store.read(0, 3).sample[0] == 0
        for bad in [(-1, 3), (3, 2), (0, 91)]:
            with pytest.raises(GradnetError, match='outside'):
                store.read(*bad)
        with pytest.raises(GradnetError, match=r'lie in \[0, 90\)'):
            store.read_rows([3, 90])
        with pytest.raises(GradnetError, match='integer'):
            store.read_rows([1.5])


def test_iter_batches_sequential_shuffled_grouped(store_path):
    expected = scipy_rows(0, 90)
    with TangentStore.open(store_path) as store:
        batches = list(store.iter_batches(25))
        assert [b.csr.shape[0] for b in batches] == [25, 25, 25, 15]
        assert_same_csr(batches[1].csr, expected[25:50])

        def order(batches):
            """Row identity (sample * 3 + candidate) in batch order."""
            return [b.sample * 3 + b.candidate for b in batches]

        first = order(store.iter_batches(8, shuffle=True, seed=4))
        again = order(store.iter_batches(8, shuffle=True, seed=4))
        other = order(store.iter_batches(8, shuffle=True, seed=5))
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert not np.array_equal(np.concatenate(first),
                                  np.concatenate(other))
        flat = np.concatenate(first)
        assert sorted(flat) == list(range(90)) and \
            not np.array_equal(flat, np.arange(90))
        for batch in store.iter_batches(8, shuffle=True, seed=4):
            rows = batch.sample * 3 + batch.candidate
            assert_same_csr(batch.csr, expected[rows])

        for shuffle in (False, True):
            grouped = list(store.iter_batches(4, shuffle=shuffle, seed=1,
                                              group_by_sample=True))
            assert [len(np.unique(b.sample)) for b in grouped] == \
                [4] * 7 + [2]                       # 30 samples
            for batch in grouped:                   # whole groups only
                for s in np.unique(batch.sample):
                    assert sorted(batch.candidate[batch.sample == s]) == \
                        [0, 1, 2]
            samples = np.concatenate([b.sample for b in grouped])
            assert sorted(samples) == sorted(np.arange(90) // 3)
            assert np.array_equal(samples, np.arange(90) // 3) \
                == (not shuffle)
        with pytest.raises(GradnetError, match='batch size'):
            next(store.iter_batches(0))


def test_group_by_sample_gathers_rows_stored_apart(tmp_path):
    """All-candidates grouping works when a sample's rows are not
    adjacent (e.g. candidate-major order)."""
    writer = StoreWriter.create(tmp_path / 'g.h5', N_COLUMNS, LAYOUT,
                                PROVENANCE)
    csr, _, _, _ = make_rows(0, 12, N_COLUMNS)
    rows = np.arange(12)
    sample = np.array([7, 2, 9, 0])[rows % 4]           # 4 samples x 3
    writer.append(csr, sample, rows // 4, rows % 4)
    with TangentStore.open(writer.finalize()) as store:
        batches = list(store.iter_batches(3, group_by_sample=True))
    # groups in order of first appearance, rows of a group in stored order
    np.testing.assert_array_equal(batches[0].sample,
                                  [7, 7, 7, 2, 2, 2, 9, 9, 9])
    np.testing.assert_array_equal(batches[0].candidate,
                                  [0, 1, 2, 0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(batches[1].sample, [0, 0, 0])
    assert_same_csr(batches[1].csr, csr.to_scipy()[[3, 7, 11]])


def test_column_stats_equal_numpy(store_path):
    matrix = scipy_rows(0, 90).tocsc()
    count = np.diff(matrix.indptr)
    with TangentStore.open(store_path) as store:
        stats = store.column_stats()
    np.testing.assert_array_equal(stats['count'], count)
    assert stats['count'].dtype == np.int64 and stats['sum'].dtype == \
        np.float64
    for column in range(N_COLUMNS):
        values = matrix.data[matrix.indptr[column]:
                             matrix.indptr[column + 1]].astype(np.float64)
        if values.size == 0:
            assert stats['min'][column] == np.inf
            assert stats['max'][column] == -np.inf
            continue
        assert stats['min'][column] == values.min()
        assert stats['max'][column] == values.max()
        np.testing.assert_allclose(stats['sum'][column], values.sum(),
                                   rtol=1e-12)
        np.testing.assert_allclose(stats['sumsq'][column],
                                   (values ** 2).sum(), rtol=1e-12)


def test_column_stats_of_an_empty_and_a_constant_column(tmp_path):
    # column 0 never has a nonzero, column 1 holds 0.5 in every row,
    # column 2 varies: the statistics the format promises for each
    rows = 6
    values = np.arange(1, rows + 1, dtype=np.float32)
    indptr = np.arange(0, 2 * rows + 1, 2, dtype=np.int64)
    indices = np.tile(np.array([1, 2], np.int32), rows)
    data = np.stack([np.full(rows, 0.5, np.float32), values], 1).ravel()
    writer = StoreWriter.create(tmp_path / 'c.h5', 3, {}, PROVENANCE,
                                total_rows=rows)
    writer.append(CSR(indptr, indices, data, (rows, 3)), np.arange(rows),
                  np.zeros(rows, int), np.zeros(rows, int))
    with TangentStore.open(writer.finalize()) as store:
        stats = store.column_stats()
    np.testing.assert_array_equal(stats['count'], [0, rows, rows])
    np.testing.assert_array_equal(stats['min'], [np.inf, 0.5, 1])
    np.testing.assert_array_equal(stats['max'], [-np.inf, 0.5, rows])
    np.testing.assert_array_equal(stats['sum'], [0, 0.5 * rows, 21])
    np.testing.assert_array_equal(stats['sumsq'], [0, 0.25 * rows, 91])


def _race_writer(path, barrier, outcomes):
    """One of the racing processes: write rows 0:30 of ``path`` in
    batches of 10 (resuming whatever is there), report how it ended."""
    barrier.wait()
    try:
        writer = StoreWriter.create_or_resume(path, N_COLUMNS, LAYOUT,
                                              PROVENANCE, total_rows=30)
        with writer:
            for start in range(writer.n_rows, 30, 10):
                writer.append(*make_rows(start, start + 10, N_COLUMNS))
            writer.finalize()
        outcomes.put('ok')
    except GradnetError as e:
        outcomes.put('busy' if 'another process' in str(e) else repr(e))
    except Exception as e:        # the outcome the lock must prevent
        outcomes.put(repr(e))


def test_concurrent_writers_race_one_wins_the_rest_are_told(tmp_path):
    """Real processes released together on one store path, over and over:
    each either writes (or finds) the finished store or is told that
    another process writes it; the store ends exact, no file is left."""
    import multiprocessing
    context = multiprocessing.get_context('fork')
    for round_ in range(12):
        path = tmp_path / f'race{round_}.h5'
        barrier, outcomes = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_race_writer,
                                     args=(path, barrier, outcomes))
                     for _ in range(4)]
        for process in processes:
            process.start()
        ends = sorted(outcomes.get(timeout=60) for _ in processes)
        for process in processes:
            process.join()
        assert set(ends) <= {'ok', 'busy'} and 'ok' in ends, ends
        with TangentStore.open(path) as store:
            assert_same_csr(store.read(0, 30).csr, scipy_rows(0, 30))
        assert set(os.listdir(tmp_path)) == {f'race{k}.h5'
                                             for k in range(round_ + 1)}


def test_incomplete_extraction_is_refused_until_finalized(tmp_path):
    path = tmp_path / 'part.h5'
    writer = StoreWriter.create(path, N_COLUMNS, LAYOUT, PROVENANCE,
                                total_rows=20)
    writer.append(*make_rows(0, 6, N_COLUMNS))
    with pytest.raises(GradnetError, match='extraction incomplete: 6 of 20 '
                                           'rows; re-run the same command'):
        writer.finalize()
    writer.close()
    assert not path.exists()
    with pytest.raises(GradnetError, match='extraction incomplete: 6 of 20'):
        TangentStore.open(path)
    with TangentStore.open(path, allow_incomplete=True) as store:
        assert len(store) == 6 and not store.complete
        assert_same_csr(store.read(0, 6).csr, scipy_rows(0, 6))
        assert_same_csr(store.read_rows([5, 1]).csr, scipy_rows(0, 6)[[5, 1]])
        np.testing.assert_array_equal(
            store.column_stats()['count'],
            np.bincount(scipy_rows(0, 6).indices, minlength=N_COLUMNS))
    writer, done = StoreWriter.resume(path, PROVENANCE)
    assert done == 6
    with pytest.raises(GradnetError, match='exceed the announced 20'):
        writer.append(*make_rows(6, 21, N_COLUMNS))
    writer.append(*make_rows(6, 20, N_COLUMNS))
    writer.finalize()
    assert not (tmp_path / ('part.h5' + JOURNAL_SUFFIX)).exists()
    with TangentStore.open(path) as store:
        assert_same_csr(store.read(0, 20).csr, scipy_rows(0, 20))


def test_never_finalized_hdf5_is_refused(store_path):
    with h5py.File(store_path, 'r+') as f:
        f.attrs['complete'] = False
    with pytest.raises(GradnetError, match='incomplete'):
        TangentStore.open(store_path)


@pytest.mark.parametrize('keep', [0.5, 0.97, -1])
def test_truncated_store_is_refused(store_path, tmp_path, keep):
    size = os.path.getsize(store_path)
    cut = tmp_path / 'cut.h5'
    shutil.copy(store_path, cut)
    os.truncate(cut, size - 1 if keep == -1 else int(size * keep))
    with pytest.raises(GradnetError, match='truncated or corrupt HDF5'):
        TangentStore.open(cut)


@pytest.mark.parametrize('compression', ['blosc2-zstd', 'gzip', 'none'])
def test_corrupt_chunk_is_refused_on_read(tmp_path, compression):
    path = write_store(tmp_path / 'c.h5', [0, 40], compression)
    with h5py.File(path, 'r') as f:
        offset = f['X/data'].id.get_chunk_info(2).byte_offset
    with open(path, 'r+b') as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    with TangentStore.open(path) as store:
        with pytest.raises(GradnetError, match='corrupt'):
            store.read(0, 40)


def test_other_format_version_is_refused(store_path):
    with h5py.File(store_path, 'r+') as f:
        f.attrs['format_version'] = 99
    with pytest.raises(GradnetError, match='format version 99.*reads '
                                           'version 1'):
        TangentStore.open(store_path)


def test_non_store_files_are_refused(tmp_path):
    other = tmp_path / 'other.h5'
    with h5py.File(other, 'w') as f:
        f['x'] = np.arange(3)
    with pytest.raises(GradnetError, match='not a gradnet-cupy tangent'):
        TangentStore.open(other)
    text = tmp_path / 'notes.h5'
    text.write_text('not hdf5 at all\n' * 100)
    with pytest.raises(GradnetError, match='not an HDF5 file'):
        TangentStore.open(text)
    with pytest.raises(GradnetError, match='no tangent store'):
        TangentStore.open(tmp_path / 'missing.h5')


def test_a_different_extraction_is_never_overwritten(tmp_path, store_path):
    changed = dict(PROVENANCE, q=90)
    with pytest.raises(GradnetError, match='different extraction.*q: 85 '
                                           r'\(expected 90\)'):
        StoreWriter.create_or_resume(store_path, N_COLUMNS, LAYOUT, changed,
                                     total_rows=90)
    with pytest.raises(GradnetError, match='already exists'):
        StoreWriter.create(store_path, N_COLUMNS, LAYOUT, PROVENANCE)
    path = tmp_path / 'p.h5'
    writer = StoreWriter.create(path, N_COLUMNS, LAYOUT, PROVENANCE,
                                total_rows=30)
    writer.append(*make_rows(0, 3, N_COLUMNS))
    writer.close()
    with pytest.raises(GradnetError, match='different extraction.*q: 85'):
        StoreWriter.resume(path, changed)
    with pytest.raises(GradnetError, match='total_rows: 30 .expected 31'):
        StoreWriter.create_or_resume(path, N_COLUMNS, LAYOUT, PROVENANCE,
                                     total_rows=31)
    writer, done = StoreWriter.resume(path, PROVENANCE)   # still intact
    assert done == 3
    writer.close()


def test_finished_extraction_is_reported_complete(store_path):
    writer = StoreWriter.create_or_resume(store_path, N_COLUMNS, LAYOUT,
                                          PROVENANCE, total_rows=90)
    assert writer.complete and writer.n_rows == 90
    assert writer.finalize() == store_path
    with pytest.raises(GradnetError, match='finalized'):
        writer.append(*make_rows(0, 1, N_COLUMNS))


def test_second_writer_is_locked_out(tmp_path):
    path = tmp_path / 'l.h5'
    writer = StoreWriter.create(path, N_COLUMNS, LAYOUT, PROVENANCE)
    writer.append(*make_rows(0, 2, N_COLUMNS))
    with pytest.raises(GradnetError, match='another process'):
        StoreWriter.resume(path, PROVENANCE)
    writer.close()
    writer, done = StoreWriter.resume(path, PROVENANCE)
    assert done == 2
    writer.close()


def test_bad_batches_are_refused(tmp_path):
    writer = StoreWriter.create(tmp_path / 'b.h5', N_COLUMNS, LAYOUT,
                                PROVENANCE)
    csr, sample, candidate, target = make_rows(0, 4, N_COLUMNS)
    unsorted = csr.indices.copy()
    unsorted[[1, 2]] = unsorted[[2, 1]]
    nan = csr.data.copy()
    nan[3] = np.nan
    cases = [
        (CSR(csr.indptr, csr.indices, csr.data, (4, N_COLUMNS + 1)),
         sample, candidate, target, '701 columns'),
        (csr._replace(indices=unsorted), sample, candidate, target,
         'strictly increasing'),
        (csr._replace(indices=csr.indices + N_COLUMNS), sample, candidate,
         target, r'out of range \[0, 700\)'),
        (csr._replace(data=nan), sample, candidate, target, 'NaN'),
        (csr._replace(indptr=csr.indptr[::-1].copy()), sample, candidate,
         target, 'indptr must rise'),
        (csr, sample[:3], candidate, target, 'sample must be 4'),
        (csr, sample, candidate + 40000, target, 'candidate values must fit'),
        (csr, sample, candidate, target.astype(float), 'target must be'),
    ]
    for bad_csr, bad_sample, bad_candidate, bad_target, message in cases:
        with pytest.raises(GradnetError, match=message):
            writer.append(bad_csr, bad_sample, bad_candidate, bad_target)
    assert writer.n_rows == 0
    writer.append(csr, list(sample), candidate, target)   # lists are fine
    assert writer.n_rows == 4
    writer.close()
    with pytest.raises(GradnetError, match='block_sizes sum to 700'):
        StoreWriter.create(tmp_path / 'x.h5', 699, LAYOUT, PROVENANCE)
    with pytest.raises(GradnetError, match='filled in by the store'):
        StoreWriter.create(tmp_path / 'x.h5', N_COLUMNS, LAYOUT,
                           dict(PROVENANCE, created='now'))
    with pytest.raises(GradnetError, match='JSON'):
        StoreWriter.create(tmp_path / 'x.h5', N_COLUMNS, LAYOUT,
                           dict(PROVENANCE, model=object()))
    with pytest.raises(GradnetError, match='unknown compression'):
        StoreWriter.create(tmp_path / 'x.h5', N_COLUMNS, LAYOUT,
                           PROVENANCE, compression='zstd')


def test_torn_journal_tail_is_cut_off(tmp_path):
    """Every way the last batch can be half-written (cut anywhere, or
    garbage behind it) resumes at the previous batch boundary."""
    reference = tmp_path / 'reference.partial'
    writer = StoreWriter.create(tmp_path / 'reference', N_COLUMNS, LAYOUT,
                                PROVENANCE, total_rows=30)
    writer.append(*make_rows(0, 10, N_COLUMNS))
    committed = os.path.getsize(reference)
    writer.append(*make_rows(10, 20, N_COLUMNS))
    full = os.path.getsize(reference)
    writer.close()
    cuts = (0, 1, 12, 23, 24, 25, 1000, full - committed - 1)
    damaged = [lambda b, cut=cut: b[:committed + cut] for cut in cuts]
    # eight different cuts, each bound to its own byte (no late binding)
    assert [len(d(reference.read_bytes())) for d in damaged] == \
        [committed + cut for cut in cuts]
    damaged += [lambda b: b[:committed] + b'\0' * 5000,
                lambda b: b + b'GREC' + os.urandom(300),
                lambda b: b[:full - 7] + b'\xff' + b[full - 6:]]
    expected_rows = [10] * 8 + [10, 20, 10]
    for case, (damage, rows) in enumerate(zip(damaged, expected_rows)):
        path = tmp_path / f'case{case}.h5'
        journal = tmp_path / f'case{case}.h5{JOURNAL_SUFFIX}'
        journal.write_bytes(damage(reference.read_bytes()))
        writer, done = StoreWriter.resume(path, PROVENANCE)
        assert done == rows, case
        assert os.path.getsize(journal) == (committed if rows == 10
                                            else full)   # tail cut off
        writer.append(*make_rows(done, 30, N_COLUMNS))
        writer.finalize()
        with TangentStore.open(path) as store:
            assert_same_csr(store.read(0, 30).csr, scipy_rows(0, 30))


def test_failed_write_is_cut_off(tmp_path):
    """A batch whose write fails half-way (here: after its header) leaves
    no trace: the next batch follows the last complete one."""
    path = tmp_path / 'f.h5'
    writer = StoreWriter.create(path, N_COLUMNS, LAYOUT, PROVENANCE,
                                total_rows=30)
    writer.append(*make_rows(0, 10, N_COLUMNS))
    journal, calls = writer._file, []

    class FailingJournal:
        def write(self, data):
            calls.append(len(data))
            if len(calls) == 2:
                raise OSError(28, 'No space left on device')
            return journal.write(data)

        def __getattr__(self, name):
            return getattr(journal, name)

    writer._file = FailingJournal()
    with pytest.raises(OSError, match='No space'):
        writer.append(*make_rows(10, 20, N_COLUMNS))
    writer._file = journal
    assert writer.n_rows == 10
    writer.append(*make_rows(10, 20, N_COLUMNS))
    writer.close()
    writer, done = StoreWriter.resume(path, PROVENANCE)   # reads the file
    assert done == 20
    writer.append(*make_rows(20, 30, N_COLUMNS))
    with TangentStore.open(writer.finalize()) as store:
        assert_same_csr(store.read(0, 30).csr, scipy_rows(0, 30))


CRASH_SCRIPT = ROWS_SOURCE + textwrap.dedent('''
    import json, sys
    from gradnet_cupy.normalize import ColumnStats
    from gradnet_cupy.store import StoreWriter

    path, total, batch, settings = sys.argv[1:]
    total, batch, settings = int(total), int(batch), json.loads(settings)


    def step(*words):
        """Announce a point of progress, then wait until the parent says go
        (or kills this process right there)."""
        print(*words, flush=True)
        sys.stdin.readline()


    class SlowJournal:
        """Test instrumentation: the journal file written in 64 KiB pieces,
        each flushed to the OS and announced, so that the parent can kill
        this process in the middle of a record."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = memoryview(data).cast('B')
            for at in range(0, len(data), 65536):
                self.f.write(data[at:at + 65536])
                self.f.flush()
                step('piece')

        def __getattr__(self, name):
            return getattr(self.f, name)


    add = ColumnStats.add_entries

    def announced_add(self, indices, data):
        """Test instrumentation: announce each block finalize writes."""
        add(self, indices, data)
        step('finalize-block')


    ColumnStats.add_entries = announced_add
    writer = StoreWriter.create_or_resume(
        path, settings['n_columns'], settings['layout'],
        settings['provenance'], total_rows=total, chunk_elements=4096)
    writer._file = SlowJournal(writer._file)
    step('start', writer.n_rows)
    for start in range(writer.n_rows, total, batch):
        writer.append(*make_rows(start, min(start + batch, total),
                                 settings['n_columns']))
        step('committed', writer.n_rows)
    step('finalizing')
    writer.finalize()
    print('done', flush=True)
''')


def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_file(
        tmp_path):
    """A real extraction process killed with SIGKILL several times (before
    its first batch, between batches, in the middle of writing a batch,
    during finalize) and re-run with the same command ends with exactly the
    rows of an uninterrupted run, and never loses a batch it reported as
    committed."""
    script = tmp_path / 'extract.py'
    script.write_text(CRASH_SCRIPT)
    settings = json.dumps({'n_columns': 3000, 'layout': {'block_sizes':
                                                         [1000, 2000]},
                           'provenance': PROVENANCE})

    def run(path, kill_when=None):
        """Run the script, stepping it point by point; SIGKILL it at the
        first point where ``kill_when(word, committed, pieces)`` is true
        (pieces: journal pieces written since the last commit). Returns
        (rows it started at, last committed row count it reported, whether
        it finished)."""
        process = subprocess.Popen(
            [sys.executable, str(script), str(path), '600', '40', settings],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started, committed, pieces = None, 0, 0
        for line in process.stdout:
            word, *count = line.split()
            if word == 'start':
                started = int(count[0])
            elif word == 'committed':
                committed, pieces = int(count[0]), 0
            elif word == 'piece':
                pieces += 1
            if kill_when is not None and kill_when(word, committed, pieces):
                process.send_signal(signal.SIGKILL)
                break
            if word != 'done':
                process.stdin.write('go\n')
                process.stdin.flush()
        process.stdout.close()
        process.stdin.close()
        code = process.wait()
        assert code in (0, -signal.SIGKILL)
        return started, committed, code == 0

    def journal_is_torn(path):
        journal = path.with_name(path.name + JOURNAL_SUFFIX)
        return os.path.getsize(journal) != _scan_journal(journal)[2]

    whole = tmp_path / 'whole.h5'
    assert run(whole)[2]

    path = tmp_path / 'killed.h5'
    tmp = tmp_path / 'killed.h5.tmp'
    kills = [   # (when to kill, what the files must look like after it)
        (lambda word, n, pieces: word == 'start', lambda: not tmp.exists()),
        (lambda word, n, pieces: word == 'committed' and n >= 160,
         lambda: not journal_is_torn(path)),
        (lambda word, n, pieces: n >= 280 and pieces == 3,
         lambda: journal_is_torn(path)),
        (lambda word, n, pieces: n >= 440 and pieces == 1,
         lambda: journal_is_torn(path)),
        (lambda word, n, pieces: word == 'finalize-block' and pieces == 0,
         lambda: tmp.exists() and not path.exists()),
    ]
    acknowledged = 0
    for kill_when, killed_state in kills:
        started, committed, finished = run(path, kill_when)
        assert not finished and killed_state()
        assert started == acknowledged   # no reported batch was lost
        acknowledged = max(acknowledged, committed)
        with pytest.raises(GradnetError, match='extraction incomplete'):
            TangentStore.open(path)
    started, _, finished = run(path)
    assert finished and started == acknowledged == 600
    with TangentStore.open(whole) as a, TangentStore.open(path) as b:
        assert len(a) == len(b) == 600 and a.nnz == b.nnz
        for row in range(600):
            x, y = a.read(row, row + 1), b.read(row, row + 1)
            for field in ('sample', 'candidate', 'target'):
                np.testing.assert_array_equal(getattr(x, field),
                                              getattr(y, field))
            np.testing.assert_array_equal(x.csr.indices, y.csr.indices)
            np.testing.assert_array_equal(x.csr.data, y.csr.data)
        stats_a, stats_b = a.column_stats(), b.column_stats()
        expected = make_rows(0, 600, 3000)[0].to_scipy()
        assert_same_csr(b.read(0, 600).csr, expected)
    for name in ('count', 'min', 'max'):
        np.testing.assert_array_equal(stats_a[name], stats_b[name])
    for name in ('sum', 'sumsq'):
        np.testing.assert_allclose(stats_a[name], stats_b[name], rtol=1e-12)
    assert not (tmp_path / ('killed.h5' + JOURNAL_SUFFIX)).exists()
    assert not tmp.exists()


def test_merge_of_shards_equals_one_store(tmp_path):
    single = write_store(tmp_path / 'single.h5', [0, 25, 60, 90])
    shard_bounds = [[0, 25, 30], [30, 60], [60, 70, 90]]
    shards = [write_store(tmp_path / f'shard{i}.h5', bounds,
                          provenance=dict(PROVENANCE, shard=[i, 3]))
              for i, bounds in enumerate(shard_bounds)]
    merged = merge([shards[2], shards[0], shards[1]], tmp_path / 'm.h5',
                   rows_per_block=7)
    with TangentStore.open(single) as a, TangentStore.open(merged) as b:
        assert len(b) == 90 and b.layout == a.layout
        assert 'shard' not in b.provenance
        assert {k: b.provenance[k] for k in PROVENANCE} == PROVENANCE
        x, y = a.read(0, 90), b.read(0, 90)
        assert_same_csr(y.csr, x.csr.to_scipy())
        for field in ('sample', 'candidate', 'target'):
            np.testing.assert_array_equal(getattr(x, field),
                                          getattr(y, field))
        stats_a, stats_b = a.column_stats(), b.column_stats()
    for name in ('count', 'min', 'max'):
        np.testing.assert_array_equal(stats_a[name], stats_b[name])
    for name in ('sum', 'sumsq'):
        np.testing.assert_allclose(stats_a[name], stats_b[name], rtol=1e-12)
    with h5py.File(merged, 'r') as f:
        sources = json.loads(f.attrs['merged_from'])
    assert [s['rows'] for s in sources] == [30, 30, 30]

    with pytest.raises(GradnetError, match='each of the 3 shards'):
        merge(shards[:2], tmp_path / 'm2.h5')
    with pytest.raises(GradnetError, match='already exists'):
        merge(shards, merged)
    odd = write_store(tmp_path / 'odd.h5', [60, 90],
                      provenance=dict(PROVENANCE, shard=[2, 3], q=90))
    with pytest.raises(GradnetError, match='not a shard of the same '
                                           'extraction.*q: 90'):
        merge([shards[0], shards[1], odd], tmp_path / 'm3.h5')
    with pytest.raises(GradnetError, match='not a shard'):
        merge([single], tmp_path / 'm4.h5')
    assert not (tmp_path / 'm3.h5').exists()


def test_file_sha256(tmp_path):
    path = tmp_path / 'model.npz'
    path.write_bytes(b'abc')
    assert file_sha256(path) == ('ba7816bf8f01cfea414140de5dae2223b00361a396'
                                 '177a9cb410ff61f20015ad')
