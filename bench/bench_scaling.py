"""Extraction and GradNet training throughput with 1, 2, ... MPI ranks
(``--mpi``, docs/scaling.rst), and the speed-up ratios, measured in one run.

Everything goes through the command line as a user runs it, each rank
count timed from ``mpiexec`` start to exit (process start-up, Chainer
import, the merge of the shards and writing the outputs included):

1. ``mpiexec -n N gradnet-cupy extract --mpi`` of the first ``--samples``
   digits of the embedded MNIST's gradnet split (one random candidate per
   digit) with the base network ``--arch`` (initial weights of seed 0: the
   cost does not depend on training): rows/s;
2. ``mpiexec -n N gradnet-cupy fit --mpi`` on that store (and a test store
   of ``--test-samples`` digits, all candidates, extracted once before),
   ``--epochs`` epochs with ``--batch`` rows per rank (so a global batch of
   N x batch, the equal-results rule of docs/scaling.rst), evaluated at the
   end only: training rows/s (rows x epochs / seconds).

``speedup`` is the rate with N ranks over the rate with 1 rank. The load
average before and after is recorded: on a shared machine other processes
take cores from the ranks.

    .venv/bin/python bench/bench_scaling.py [--ranks 1,2] [--device cpu]

writes bench/results/scaling-<device>.json. On a GPU machine pass
``--device gpu --ranks 1,2,...`` up to the GPUs present (one per rank).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, result_path  # noqa: E402

from gradnet_cupy.data import load_dataset  # noqa: E402
from gradnet_cupy.models import build_model  # noqa: E402
from gradnet_cupy.train_base import save_snapshot  # noqa: E402

BIN = Path(sys.executable).parent


def timed_ranks(n, args):
    """Seconds of ``mpiexec -n n gradnet-cupy ARGS --mpi --json`` and its
    JSON summary (rank 0's)."""
    command = [str(BIN / 'mpiexec'), '-n', str(n), str(BIN / 'gradnet-cupy'),
               *map(str, args), '--mpi', '--json']
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def with_speedup(runs, rate):
    """``runs`` with ``speedup``: each run's ``rate`` over the 1-rank's."""
    base = runs[0][rate]
    return [dict(run, speedup=run[rate] / base) for run in runs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ranks', default='1,2')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu'))
    parser.add_argument('--arch', default='cnn')
    parser.add_argument('--samples', type=int, default=256)
    parser.add_argument('--test-samples', type=int, default=32)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch', type=int, default=25)
    parser.add_argument('--extract-batch', type=int, default=32)
    options = parser.parse_args()
    ranks = [int(n) for n in options.ranks.split(',')]
    assert ranks[0] == 1, 'the speed-ups are relative to 1 rank: start at 1'
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix='bench-scaling-'))
    try:
        data = load_dataset('mnist')
        snapshot = folder / 'base.npz'
        save_snapshot(build_model(options.arch, data.in_shape,
                                  data.n_classes, seed=0), str(snapshot))
        common = ['--model', snapshot, '--arch', options.arch, '--device',
                  options.device, '--batch', options.extract_batch]
        extract, fit = [], []
        test = folder / 'test.h5'
        timed_ranks(1, ['extract', *common, '--split', 'test',
                        '--candidates', 'all', '--subset',
                        options.test_samples, '--out', test])
        for n in ranks:
            train = folder / f'train{n}.h5'
            seconds, summary = timed_ranks(n, [
                'extract', *common, '--subset', options.samples, '--out',
                train])
            extract.append({'ranks': n, 'seconds': seconds,
                            'rows': summary['rows'],
                            'rows_per_s': summary['rows'] / seconds})
        for n in ranks:
            seconds, summary = timed_ranks(n, [
                'fit', '--train', folder / f'train{ranks[0]}.h5', '--test',
                test, '--epochs', options.epochs, '--batch', options.batch,
                '--eval-every', 0, '--device', options.device, '--out',
                folder / f'fit{n}'])
            rows = extract[0]['rows'] * options.epochs
            fit.append({'ranks': n, 'global_batch': n * options.batch,
                        'seconds': seconds, 'rows_per_s': rows / seconds,
                        'test_accuracy': summary['test_accuracy']})
    finally:
        shutil.rmtree(folder)
    result = {
        'benchmark': 'scaling', 'device': options.device,
        'device_name': device_name(options.device),
        'command': ' '.join([Path(sys.executable).name, *sys.argv]),
        'settings': vars(options),
        'load_average_before': load_before,
        'load_average_after': os.getloadavg(),
        'extract': with_speedup(extract, 'rows_per_s'),
        'fit': with_speedup(fit, 'rows_per_s')}
    path = result_path('scaling', options.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + '\n')
    for stage in ('extract', 'fit'):
        for run in result[stage]:
            print(f"{stage} {run['ranks']} rank(s): {run['rows_per_s']:.1f} "
                  f"rows/s, speed-up {run['speedup']:.2f}")
    print(f'written to {path}')


if __name__ == '__main__':
    main()
