"""Per-kernel GPU profile of the package's two kernel families (not a test).

Runs, after one warm-up call each, ``percentile_sparsify`` on the bench's
cnn case (256 rows of the cnn's layer blocks, q = 85) and on one
1,000,000-entry segment per row, and ``block_outer_accumulate`` with
``method='sparse'`` on 2,048 rows of blocks of 8 and of 4,096 columns at 1%
density (float64 ``G``), between ``cupy.cuda.profiler.start()`` and
``stop()``. Under Nsight Compute with ``--profile-from-start off`` only
those calls' kernels are profiled: their duration, achieved DRAM
throughput, occupancy and launch shapes. bench_sparsify.py and
bench_metric.py time the same workloads end to end; this says which launch
the time goes to::

    ncu --profile-from-start off --section SpeedOfLight --section LaunchStats \\
        --section Occupancy python bench/profile_kernels.py

Without ncu the script still runs (the profiler calls are no-ops) and
prints each call's wall time from CUDA events. Needs CuPy and a GPU.
"""
import numpy as np

from bench_metric import random_batch
from bench_sparsify import CASES, Q
from gradnet_cupy.backend import gpu_available, import_cupy
from gradnet_cupy.kernels import Blocks, block_outer_accumulate, percentile_sparsify

ROWS_SPARSIFY = 256
ROWS_METRIC = 2048
DENSITY = 0.01


def workloads(cupy, rng):
    """(name, callable) of every profiled call."""
    calls = []
    for name, sizes in CASES.items():
        g = cupy.asarray(rng.standard_normal(
            (ROWS_SPARSIFY, sum(sizes))).astype(np.float32))
        calls.append((f'sparsify {name}',
                      lambda g=g, sizes=sizes: percentile_sparsify(g, sizes, Q)))
    for size, count in ((8, 512), (4096, 1)):
        blocks = Blocks.contiguous([size] * count)
        batch = random_batch(rng, ROWS_METRIC, size * count, DENSITY, cupy)
        G = cupy.zeros(blocks.packed_size)
        calls.append((f'block_outer sparse, blocks of {size}, 1%',
                      lambda b=batch, bl=blocks, G=G: block_outer_accumulate(
                          b, bl, G, method='sparse', validate=False)))
    return calls


def main():
    if not gpu_available():
        raise SystemExit('error: profile_kernels.py needs CuPy and a GPU')
    cupy = import_cupy()
    calls = workloads(cupy, np.random.default_rng(0))
    for _, call in calls:      # compilation, uploads, allocator
        call()
    cupy.cuda.Device().synchronize()
    for name, call in calls:
        begin, end = cupy.cuda.Event(), cupy.cuda.Event()
        cupy.cuda.profiler.start()
        begin.record()
        call()
        end.record()
        end.synchronize()
        cupy.cuda.profiler.stop()
        print(f'{name}: {cupy.cuda.get_elapsed_time(begin, end):.3f} ms')


if __name__ == '__main__':
    main()
