"""Sparse vs dense block_outer_accumulate: where is the crossover?

For every block size s and density d, a CSR batch of ``--rows`` rows over
``max(s, --columns)`` columns cut into blocks of s columns (each entry
nonzero with probability d, float32; many small blocks as in a per-unit or
diagonal partition, one block from s = --columns up) is accumulated into a
float64 G by ``method='sparse'`` and by ``method='dense'``
(best of ``--repeat`` timed calls after one warm-up, GPU synchronized). The
crossover of a size is the density where dense becomes as fast as sparse
(log-log interpolation between the bracketing densities; above the largest
density measured -> 1.01, i.e. never dense; dense already faster at the
smallest -> that density). Writes bench/results/metric-<device>.json;
``--install`` also copies the crossovers into the package's
kernels/block_outer_crossover.json for the backend (numpy or cupy) used.

On the CPU the NumPy sparse path costs ~100 ns per pair of nonzeros, so a
size's remaining (denser) points are skipped once dense has won twice in a
row: sparse only gets slower with density while dense does not, so they
cannot move the crossover. Skipped points are listed as such. On a shared
CPU, BLAS threads fighting other processes make dense timings erratic: run
with one BLAS thread (below); on the CPU every time is CPU time
(``time.process_time``), which other jobs on the machine do not inflate; the
JSON records the thread setting and the load average.

Then the dispatcher (``method='auto'``, reading the packaged table, so after
``--install`` the crossovers just measured) is timed with both paths again at
every measured point: ``auto_over_best`` is its time over the faster path's
(target: <= 1.1 everywhere).

    OPENBLAS_NUM_THREADS=1 python bench/bench_metric.py --device cpu --install
    python bench/bench_metric.py --device gpu --install
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

import gradnet_cupy
from common import best_cpu_time, best_time, device_name, result_path
from gradnet_cupy.backend import array_module, resolve_device
from gradnet_cupy.kernels import CSR, Blocks, block_outer_accumulate

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / 'kernels' / 'block_outer_crossover.json'


def random_batch(rng, rows, columns, density, xp):
    """CSR (of module ``xp``) with each entry nonzero with prob. density."""
    mask = rng.random((rows, columns)) < density
    row, column = np.nonzero(mask)
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(mask.sum(1), out=indptr[1:])
    data = rng.standard_normal(len(row)).astype(np.float32)
    return CSR(xp.asarray(indptr), xp.asarray(column.astype(np.int32)),
               xp.asarray(data), (rows, columns))


def crossover(densities, ratios):
    """Density where dense/sparse time ratio falls to 1 (see module doc)."""
    for i, ratio in enumerate(ratios):
        if ratio <= 1:
            if i == 0:
                return densities[0]
            x0, x1 = np.log(densities[i - 1]), np.log(densities[i])
            y0, y1 = np.log(ratios[i - 1]), np.log(ratio)
            return float(np.exp(x0 + (x1 - x0) * y0 / (y0 - y1)))
    return 1.01


def timer(xp, repeat):
    """``function -> seconds``: CPU time on the CPU, synchronised wall time
    on the GPU (best of ``repeat`` after a warm-up)."""
    if xp is np:
        return lambda function: best_cpu_time(function, repeat)
    return lambda function: best_time(function, xp, repeat)


def time_methods(csr, blocks, xp, methods, time):
    """{method: seconds} of accumulating ``csr`` into a fresh G."""
    G = xp.zeros(blocks.packed_size)
    return {method: time(lambda: block_outer_accumulate(
        csr, blocks, G, method=method)) for method in methods}


def measure(args):
    """(result dict, [(point, csr, blocks)] of the measured points)."""
    device = resolve_device(args.device)
    xp = array_module(device)
    time = timer(xp, args.repeat)
    rng = np.random.default_rng(args.seed)
    points, crossovers, cases = [], [], []
    for size in args.sizes:
        blocks = Blocks.contiguous([size] * max(1, args.columns // size))
        ratios, measured, losses = [], [], 0
        for density in args.densities:
            point = {'block_size': size, 'blocks': len(blocks),
                     'density': density, 'rows': args.rows}
            if losses >= 2:
                point['skipped'] = 'dense won at two lower densities'
                points.append(point)
                continue
            csr = random_batch(rng, args.rows, blocks.n_columns, density, xp)
            for method, seconds in time_methods(
                    csr, blocks, xp, ('sparse', 'dense'), time).items():
                point[f'{method}_s'] = seconds
            cases.append((point, csr, blocks))
            ratio = point['dense_s'] / point['sparse_s']
            point['dense_over_sparse'] = ratio
            losses = losses + 1 if ratio <= 1 else 0
            ratios.append(ratio)
            measured.append(density)
            points.append(point)
            print(f"size {size:5d} density {density:5.2f}: sparse "
                  f"{point['sparse_s'] * 1e3:9.2f} ms  dense "
                  f"{point['dense_s'] * 1e3:9.2f} ms  dense/sparse "
                  f"{ratio:7.3f}", flush=True)
        crossovers.append(crossover(measured, ratios))
    name = device_name(device)
    versions = {'python': platform.python_version(),
                'numpy': np.__version__,
                'gradnet_cupy': gradnet_cupy.__version__}
    if device == 'gpu':
        versions['cupy'] = xp.__version__
        versions['cuda_runtime'] = xp.cuda.runtime.runtimeGetVersion()
    return {
        'benchmark': 'block_outer_accumulate sparse vs dense',
        'device': device, 'device_name': name,
        'backend': 'numpy' if device == 'cpu' else 'cupy',
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        'command': ' '.join(['python'] + sys.argv),
        'versions': versions, 'G_dtype': 'float64', 'rows': args.rows,
        'host': {'cpu_count': os.cpu_count(),
                 'load_average_at_end': os.getloadavg(),
                 'blas_thread_env': {key: os.environ[key] for key in (
                     'OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')
                     if key in os.environ}},
        'repeat': args.repeat, 'points': points,
        'crossovers': {'block_sizes': list(args.sizes),
                       'crossover_density': crossovers},
        'timing': 'CPU seconds (process_time)' if xp is np else
                  'wall seconds, GPU synchronised',
    }, cases


def check_dispatch(cases, xp, repeat):
    """The auto dispatcher against both paths at every measured point."""
    time = timer(xp, repeat)
    checks = []
    for point, csr, blocks in cases:
        seconds = time_methods(csr, blocks, xp, ('auto', 'sparse', 'dense'),
                               time)
        check = {'block_size': point['block_size'],
                 'density': point['density'],
                 **{f'{m}_s': s for m, s in seconds.items()},
                 'auto_over_best': seconds['auto'] / min(seconds['sparse'],
                                                         seconds['dense'])}
        checks.append(check)
        print(f"size {check['block_size']:5d} density "
              f"{check['density']:5.2f}: auto/best "
              f"{check['auto_over_best']:6.3f}", flush=True)
    ratios = [c['auto_over_best'] for c in checks]
    return {'points': checks, 'worst_auto_over_best': max(ratios),
            'points_within_10_percent': sum(r <= 1.1 for r in ratios),
            'points_measured': len(ratios)}


def install(result, results_file):
    """Writes the result's crossovers into the packaged table."""
    table = json.loads(PACKAGED.read_text())
    table['crossovers'][result['backend']] = {
        'source': (f"{results_file.relative_to(ROOT)}: measured on "
                   f"{result['device_name']}, {result['date']}"),
        **result['crossovers']}
    PACKAGED.write_text(json.dumps(table, indent=2) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='auto',
                        choices=('auto', 'cpu', 'gpu'))
    parser.add_argument('--sizes', type=int, nargs='+',
                        default=[1, 8, 64, 256, 1024, 4096])
    parser.add_argument('--columns', type=int, default=4096,
                        help='columns of a batch (blocks of a size tile them)')
    parser.add_argument('--densities', type=float, nargs='+',
                        default=[0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5])
    parser.add_argument('--rows', type=int, default=None,
                        help='rows per batch (default 128 on CPU, 2048 on GPU)')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, default=None)
    parser.add_argument('--install', action='store_true',
                        help='copy the crossovers into the packaged table')
    args = parser.parse_args()
    if args.rows is None:
        args.rows = 2048 if resolve_device(args.device) == 'gpu' else 128
    result, cases = measure(args)
    out = args.out or result_path('metric', result['device'])
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f'crossovers {result["crossovers"]}')
    if args.install:
        install(result, out.resolve())
        print(f'installed into {PACKAGED}')
    result['dispatch'] = check_dispatch(
        cases, array_module(result['device']), args.repeat)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f"worst auto/best {result['dispatch']['worst_auto_over_best']:.3f}"
          f" -> {out}")


if __name__ == '__main__':
    main()
