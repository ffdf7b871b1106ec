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

Model (``--model-only``, no timing): the sparse CUDA path (block_outer.cu through
``sparse_launch``) runs on the CPU emulator (tests/cuda_emulation) for the
per_unit blocks of the cnn (3x24x24 input, cap 256: 642 blocks over 130,240
columns) at densities 1%, 5%, 15%, 30%: one block of every distinct size,
on a CSR of that block's columns and ``--model-rows`` rows, each counted
launch scaled to the workload's rows (``--model-batch``, default 640: the
cnn's sparsify call) and to the number of blocks of that size (the
traffic per block and row is statistically the same). Printed per density:
counted global bytes read and written, row visits (a tile's pass over one
row), and bench/roofline.py's predicted H200 time, labelled "model"; beside
them the dense path's bytes, an analytic count of its array operations
(zero-filled ``X``, ``X * w``, one GEMM reading each operand once, the
update of ``G``), not emulated. Writes bench/results/metric-model.json.

    python bench/bench_metric.py --model-only
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
import roofline
from common import best_cpu_time, best_time, device_name, result_path
from gradnet_cupy.backend import array_module, resolve_device
from gradnet_cupy.kernels import CSR, Blocks, block_outer_accumulate
from gradnet_cupy.kernels import block_outer

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


MODEL_DENSITIES = (0.01, 0.05, 0.15, 0.30)
ROW_GRID = ('block_outer_positions',)  # one thread block per CSR row


def merged(launches, rows):
    """The launches of one call: the per-size launches of a kernel summed
    into one (a one-block-per-row kernel keeps ``rows`` blocks)."""
    by_name = {}
    for launch in launches:
        if launch.name in by_name:
            first = by_name[launch.name]
            by_name[launch.name] = first._replace(
                blocks=first.blocks + launch.blocks, read=first.read + launch.read,
                written=first.written + launch.written,
                block_bytes=None if first.block_bytes is None
                else max(first.block_bytes, launch.block_bytes))
        else:
            by_name[launch.name] = launch
    return [launch._replace(blocks=rows) if launch.name in ROW_GRID else launch
            for launch in by_name.values()]


def cnn_unit_blocks():
    """The per_unit Blocks of the cnn on 3x24x24 input (the metric's
    default partition and cap)."""
    from gradnet_cupy.metric import layout_blocks
    from gradnet_cupy.models import build_model
    from gradnet_cupy.tangent.layout import parameter_layout

    return layout_blocks(parameter_layout(build_model('cnn', (3, 24, 24), 10)))[0]


def dense_bytes(rows, size, nnz):
    """Analytic global bytes of the dense path on one block in float64:
    zero-fill of X (rows x size), the scatter of the nnz entries (block
    slot, row, column in, value in and out), X * w (read and write), one
    GEMM reading both operands once and writing size^2, and G += product
    through an index array (read product, index, G; write G)."""
    return (8 * rows * size * (1 + 2 + 2) + nnz * (8 + 8 + 8 + 4 + 8)
            + 8 * size * size * (1 + 1 + 1 + 1 + 1))


def model_point(blocks, density, rows, batch, rng):
    """Counted launches (scaled to ``batch`` rows and every block), row
    visits and dense bytes of one density."""
    sizes, counts = np.unique(blocks.sizes, return_counts=True)
    launches, visits, dense, nnz_total = [], 0, 0, 0
    for size, count in zip(sizes.tolist(), counts.tolist()):
        one = Blocks.contiguous([size])
        csr = random_batch(rng, rows, size, density, np)
        launch, counted = roofline.counting_launcher(
            block_outer.CUDA_SOURCE, block_outer.CUDA_NAME_EXPRESSIONS,
            in_flight=block_outer.IN_FLIGHT_BYTES)
        G = np.zeros(one.packed_size)
        block_outer.sparse_launch(launch, csr, one, G,
                                  np.ones(rows, np.float32),
                                  np.ones(1, dtype=bool))
        # G and the tile and strip tables do not grow with the rows; every
        # argument's traffic grows with the blocks of the size
        launches += [roofline.scaled(
            c, count * batch / rows, fixed=block_outer.FIXED_ARGUMENTS[c.name],
            fixed_factor=count,
            blocks_factor=count * batch / rows if c.name in ROW_GRID else count)
            for c in counted]
        visits += count * batch / rows * block_outer.row_visits(csr, one)
        dense += count * dense_bytes(batch, size, csr.nnz * batch / rows)
        nnz_total += count * csr.nnz * batch / rows
    model = roofline.model_columns(merged(launches, batch), 8 * nnz_total,
                                   'H200')
    point = {'density': density, 'rows': batch, 'emulated_rows': rows,
             'nnz': nnz_total, 'row_visits': visits,
             'bytes_read': model['bytes_read'],
             'bytes_written': model['bytes_written'],
             'dense_bytes_analytic': dense,
             'model_H200_seconds': model['seconds'],
             'model_H200_dense_seconds_at_roof':
                 dense / (model['roof_GBps'] * 1e9),
             'model': model}
    print(f"model density {density:4.2f}: sparse kernel reads "
          f"{point['bytes_read'] / 1e6:9.1f} MB, writes "
          f"{point['bytes_written'] / 1e6:7.1f} MB, row visits "
          f"{visits / 1e6:8.3f} M, H200 model {model['seconds'] * 1e3:8.3f} ms"
          f" | dense path (analytic) {dense / 1e6:9.1f} MB = "
          f"{point['model_H200_dense_seconds_at_roof'] * 1e3:7.3f} ms at the "
          f"roof", flush=True)
    return point


def model(args):
    blocks = cnn_unit_blocks()
    rng = np.random.default_rng(args.seed)
    print(f'cnn per_unit blocks: {len(blocks)} over {blocks.n_columns:,} '
          f'columns, {args.model_batch} rows (emulated {args.model_rows})')
    points = [model_point(blocks, density, args.model_rows, args.model_batch,
                          rng) for density in MODEL_DENSITIES]
    result = {'kind': 'model', 'kernel': block_outer.CUDA_KERNELS[
                  np.dtype(np.float64)][0],
              'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'),
              'command': ' '.join(['python'] + sys.argv),
              'workload': {'blocks': len(blocks),
                           'columns': int(blocks.n_columns),
                           'rows': args.model_batch},
              'assumptions': roofline.assumptions(), 'points': points}
    out = args.out or ROOT / 'bench' / 'results' / 'metric-model.json'
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out}')


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
    parser.add_argument('--model-only', action='store_true',
                        help='only the roofline model of the sparse kernel '
                             'from emulator-counted bytes (module doc)')
    parser.add_argument('--model-rows', type=int, default=64)
    parser.add_argument('--model-batch', type=int, default=640)
    args = parser.parse_args()
    if args.model_only:
        return model(args)
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
