"""Throughput of percentile_sparsify; writes bench/results/sparsify-<device>.json.

Cases (q = 85, g standard normal float32, seeded): rows x the cnn layer
blocks 4,800 / 102,400 / 23,040, and rows x one 1,000,000-entry segment
(rows = 256 unless --rows).

Per case: the median and minimum wall time of percentile_sparsify (all of
it: input checks, selection, CSR) and of the alternatives (time ratios of
both are reported; on a shared CPU the minima are the steadier figure),
and the effective bandwidth = bytes of g / time, also as a fraction of the
device's memory bandwidth, measured as (bytes read + bytes written) / time
of a large copy (device to device on the GPU, numpy.copyto on the CPU).

Alternatives compute only the per-segment threshold (no CSR), so they are
a lower bound of what a plain-library implementation would cost:
  CPU  numpy.partition of |g| per segment;
  GPU  cupy.partition and cupy.sort of |g| per segment, and torch.kthvalue
       and torch.topk where torch imports.

Model (--model-only; --model adds it to a timed run, per measured case):
the CUDA path's launch sequence runs on the CPU emulator of sparsify.cu
(tests/cuda_emulation, needs g++) for --model-rows rows of each model
workload (--model-only: the cnn's 640 x 130,240 call and 256 rows x 1M
columns; --model: the measured case's shape),
which counts every byte each launch reads and writes in global memory; the
counts are scaled to the workload's rows (exact for the traffic of g and of
the per-task arrays, which is the same for every row of a case; the
candidate traffic depends on the values and is that of the emulated rows)
and bench/roofline.py turns them into a predicted H100 / H200 time. The
model is printed in its own lines, labelled "model", and stored under
"model" in the JSON, never mixed with the measured figures.

Usage:  python bench/bench_sparsify.py [--device auto|cpu|gpu] [--rows N]
        [--repeat R] [--quick] [--output PATH]
        [--model] [--model-rows 2]
        python bench/bench_sparsify.py --model-only [--model-rows 2]
        [--output PATH]     (model only, no timing)
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import roofline
from common import device_name, result_path
from gradnet_cupy.backend import import_cupy, resolve_device, to_numpy
from gradnet_cupy.kernels import percentile_sparsify
from gradnet_cupy.kernels import sparsify
from gradnet_cupy.kernels.sparsify import percentile_ranks

CASES = {'cnn': [4800, 102400, 23040], 'segment-1M': [1_000_000]}
# the model's workloads: (rows, segment sizes)
MODEL_CASES = {'cnn': (640, CASES['cnn']), 'segment-1M': (256, CASES['segment-1M'])}
Q = 85.0


class Timer:
    """Median and minimum seconds of a callable on one device."""

    def __init__(self, device, repeat):
        self.device, self.repeat = device, repeat
        self.cupy = import_cupy() if device == 'gpu' else None

    def __call__(self, func):
        func()  # warm-up: compilation, allocator, caches
        times = []
        for _ in range(self.repeat):
            if self.cupy is None:
                start = time.perf_counter()
                func()
                times.append(time.perf_counter() - start)
            else:
                begin, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
                begin.record()
                func()
                end.record()
                end.synchronize()
                times.append(self.cupy.cuda.get_elapsed_time(begin, end) / 1e3)
        return {'median_s': float(np.median(times)), 'min_s': float(min(times)),
                'repeat': self.repeat}


def copy_bandwidth(xp, timer, nbytes=1 << 30):
    """GB/s of (read + write) bytes for a copy of nbytes."""
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    seconds = timer(lambda: xp.copyto(dst, src))['median_s']
    return 2 * nbytes / seconds / 1e9


def segment_thresholds(xp, select):
    """A threshold-only alternative: select(magnitude (rows, m), lo) -> the
    lo-th smallest per row, for each segment."""
    def run(g, sizes):
        start = 0
        for m in sizes:
            lo, _, _ = percentile_ranks(m, Q / 100)
            select(xp.abs(g[:, start:start + m]), lo)
            start += m
    return run


def alternatives(device):
    """name -> f(g, sizes) for the device's plain-library alternatives."""
    if device == 'cpu':
        return {'numpy.partition': segment_thresholds(
            np, lambda a, lo: np.partition(a, lo, axis=1)[:, lo])}
    cupy = import_cupy()
    found = {
        'cupy.partition': segment_thresholds(
            cupy, lambda a, lo: cupy.partition(a, lo, axis=1)[:, lo]),
        'cupy.sort': segment_thresholds(
            cupy, lambda a, lo: cupy.sort(a, axis=1)[:, lo]),
    }
    try:
        import torch
    except ImportError:
        return found

    def torch_alternative(select):
        def run(g, sizes):
            return segment_thresholds(torch, select)(torch.as_tensor(g, device='cuda'), sizes)
        return run

    found['torch.kthvalue'] = torch_alternative(
        lambda a, lo: torch.kthvalue(a, lo + 1, dim=1).values)
    found['torch.topk'] = torch_alternative(
        lambda a, lo: torch.topk(a, a.shape[1] - lo, dim=1).values[:, -1])
    return found


def versions(device):
    found = {'python': platform.python_version(), 'numpy': np.__version__}
    if device == 'gpu':
        cupy = import_cupy()
        found['cupy'] = cupy.__version__
        found['cuda_runtime'] = cupy.cuda.runtime.runtimeGetVersion()
        found['cuda_driver'] = cupy.cuda.runtime.driverGetVersion()
    try:
        import torch
        found['torch'] = torch.__version__
    except ImportError:
        pass
    return found


def run_case(name, sizes, rows, device, timer, bandwidth, check, model_rows=None):
    xp = np if device == 'cpu' else import_cupy()
    host = np.random.default_rng(0).standard_normal((rows, sum(sizes))).astype(np.float32)
    g = xp.asarray(host)
    nbytes = g.size * 4

    def summary(timing):
        gbps = nbytes / timing['median_s'] / 1e9
        return dict(timing, GBps=gbps, fraction_of_bandwidth=gbps / bandwidth)

    ours = summary(timer(lambda: percentile_sparsify(g, sizes, Q)))
    others, failed = {}, {}
    for alt, f in alternatives(device).items():
        try:
            others[alt] = summary(timer(lambda f=f: f(g, sizes)))
        except Exception as error:  # e.g. out of memory: record, go on
            failed[alt] = f'{type(error).__name__}: {error}'
    best = min(others, key=lambda alt: others[alt]['median_s'])
    result = {'case': name, 'rows': rows, 'sizes': sizes, 'q': Q, 'bytes_of_g': nbytes,
              'percentile_sparsify': ours, 'alternatives': others,
              'failed_alternatives': failed,
              'best_alternative': best,
              'time_vs_best_alternative': ours['median_s'] / others[best]['median_s'],
              'min_time_vs_best_alternative': ours['min_s'] / others[best]['min_s']}
    if check:  # the GPU result against the NumPy reference, bit for bit
        gpu, cpu = percentile_sparsify(g, sizes, Q), percentile_sparsify(host, sizes, Q)
        result['matches_numpy'] = all(
            np.array_equal(to_numpy(a).view(np.uint8), b.view(np.uint8))
            for a, b in zip(gpu[:3], cpu[:3]))
    if model_rows:  # beside the measurement, never mixed with it
        result['model'] = model_case(name, rows, sizes, model_rows)['model']
    print(f"{name:12s} rows={rows}: {ours['median_s'] * 1e3:9.2f} ms "
          f"{ours['GBps']:7.2f} GB/s ({100 * ours['fraction_of_bandwidth']:.1f}% of copy "
          f"bandwidth); best alternative {best} {others[best]['median_s'] * 1e3:.2f} ms "
          f"-> time ratio {result['time_vs_best_alternative']:.2f} (medians), "
          f"{result['min_time_vs_best_alternative']:.2f} (minima)", flush=True)
    return result


def model_case(name, rows, sizes, model_rows, devices=('H200', 'H100-SXM')):
    """Emulator-counted bytes of the CUDA path on ``model_rows`` rows of a
    workload, scaled to ``rows``, and the roofline model's prediction."""
    host = np.random.default_rng(0).standard_normal(
        (model_rows, sum(sizes))).astype(np.float32)
    starts = sparsify.segment_offsets(sizes, host.shape[1])
    launch, launches = roofline.counting_launcher(
        sparsify.CUDA_SOURCE, in_flight=sparsify.IN_FLIGHT_BYTES,
        block_bytes=lambda kernel, grid, args, traffic: (
            (traffic.read + traffic.written) * sparsify.block_elements(
                kernel, starts) / host.size))
    csr = sparsify.sparsify_launch_sequence(host, starts, Q / 100, launch, np,
                                            sparsify.GPU_BLOCK)
    reference = percentile_sparsify(host, sizes, Q)
    exact = all(np.array_equal(a.view(np.uint8), b.view(np.uint8))
                for a, b in zip(csr[:3], reference[:3]))
    scaled = [roofline.scaled(launch, rows / model_rows) for launch in launches]
    nbytes = rows * sum(sizes) * 4
    result = {'case': name, 'rows': rows, 'sizes': sizes, 'q': Q,
              'emulated_rows': model_rows, 'bytes_of_g': nbytes,
              'matches_numpy': exact,
              'model': {device: roofline.model_columns(scaled, nbytes, device)
                        for device in devices}}
    h200 = result['model']['H200']
    print(f"model {name:12s} {rows} x {sum(sizes):,}: emulator-counted reads "
          f"{h200['read_per_payload_byte']:.3f} x g, writes "
          f"{h200['written_per_payload_byte']:.3f} x g, {len(launches)} launches; "
          + '; '.join(f"{d} model {m['seconds'] * 1e3:.3f} ms = "
                      f"{m['payload_GBps']:.0f} GB/s of g "
                      f"({100 * m['fraction_of_roof']:.1f}% of the "
                      f"{m['roof_GBps']:.0f} GB/s roof)"
                      for d, m in result['model'].items())
          + ('' if exact else '  MISMATCH with the NumPy reference'), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'gpu'])
    parser.add_argument('--rows', type=int, default=256)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--quick', action='store_true',
                        help='32 rows and 2 repeats: a smoke run, not for results')
    parser.add_argument('--output', type=Path, default=None)
    parser.add_argument('--model-only', action='store_true',
                        help='only the roofline model from emulator-counted '
                             'bytes (no timing); writes '
                             'bench/results/sparsify-model.json')
    parser.add_argument('--model', action='store_true',
                        help='also the roofline model of each measured case '
                             '(own lines and JSON key "model")')
    parser.add_argument('--model-rows', type=int, default=2,
                        help='rows emulated per model workload')
    args = parser.parse_args(argv)
    if args.model_only:
        now = datetime.datetime.now(datetime.timezone.utc)
        report = {'kind': 'model', 'date': now.isoformat(timespec='seconds'),
                  'command': ' '.join(['python', 'bench/bench_sparsify.py']
                                      + (argv or sys.argv[1:])),
                  'assumptions': roofline.assumptions(),
                  'cases': [model_case(name, rows, sizes, args.model_rows)
                            for name, (rows, sizes) in MODEL_CASES.items()]}
        output = args.output or roofline.ROOT / 'bench' / 'results' / 'sparsify-model.json'
        output.write_text(json.dumps(report, indent=2) + '\n')
        print(f'wrote {output}')
        return
    device = resolve_device(args.device)
    rows, repeat = (32, 2) if args.quick else (args.rows, args.repeat)
    timer = Timer(device, repeat)
    bandwidth = copy_bandwidth(np if device == 'cpu' else import_cupy(), timer)
    print(f'{device_name(device)}: copy bandwidth {bandwidth:.1f} GB/s', flush=True)
    cases = [run_case(name, sizes, rows, device, timer, bandwidth, check=device == 'gpu',
                      model_rows=args.model_rows if args.model else None)
             for name, sizes in CASES.items()]
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {'device': device_name(device), 'kind': device,
              'date': now.isoformat(timespec='seconds'), 'versions': versions(device),
              'command': ' '.join(['python', 'bench/bench_sparsify.py'] + (argv or sys.argv[1:])),
              'copy_bandwidth_GBps': bandwidth, 'cases': cases}
    output = args.output or result_path('sparsify', device)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {output}')


if __name__ == '__main__':
    main()
