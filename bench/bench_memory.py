"""Peak resident memory of the pipeline extract -> finalize -> fit ->
evaluate at three store sizes growing 10x (issue 18, part 1): the goal is a
peak that grows by less than 1.5x from the smallest to the largest.

Every stage is one ``gradnet-cupy`` command, run by ``gradnet_cupy.cli.main``
in a subprocess of its own (so each peak is that stage's alone):

* ``train-base`` (not in the comparison): the MLP (244,032 weights) on
  the first ``--base-subset`` images of each split, 1 epoch;
* ``extract --split gradnet --candidates random`` (S rows) and
  ``extract --split test --candidates all`` (10 S rows), with
  ``--subset S --batch 4``; each split's peak is reported for the
  extraction proper and for its ``finalize`` (journal -> HDF5)
  separately;
* ``fit --train --test --epochs 1`` (normalizer fitted on the training
  store's column statistics, one epoch, evaluation on the test store);
* ``evaluate --gradnet --test``.

Memory is sampled from ``/proc/self/status`` every 5 ms by a thread of the
stage's process: ``VmRSS`` split into ``RssAnon`` (the process's own
memory) and ``RssFile`` (pages of memory-mapped files, i.e. page cache
counted as resident), each phase's peak kept; ``VmHWM`` (the kernel's exact
peak of VmRSS) closes every stage. The peak that the goal compares is
``VmHWM``.

``--finalize-profile ROWS`` measures only the finalize of a synthetic
journal (how the 17.6 GB of issue 18 were found: run it against this
checkout and, with ``PYTHONPATH``, an older one).

    .venv/bin/python bench/bench_memory.py [--subsets 5,50,500]
        [--dataset mnist] [--data-dir DIR]

writes bench/results/memory-cpu.json. The embedded MNIST's test split has
1,000 images (10,000 test rows at most); ``--dataset fashion-mnist
--data-dir /usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``) has 10,000.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradnet_cupy
from common import device_name, result_path

SAMPLE_SECONDS = 0.005
FIELDS = ('VmRSS', 'RssAnon', 'RssFile', 'RssShmem', 'VmHWM')


def status():
    """The memory fields of ``/proc/self/status`` in bytes."""
    values = {}
    with open('/proc/self/status') as f:
        for line in f:
            name, _, rest = line.partition(':')
            if name in FIELDS:
                values[name] = int(rest.split()[0]) * 1024
    return values


class Sampler:
    """A thread sampling :func:`status` every SAMPLE_SECONDS; ``phase`` names
    what the process is doing, and each phase keeps the peak of each
    field."""

    def __init__(self):
        self.phase, self.peaks = 'start', {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.record()
            time.sleep(SAMPLE_SECONDS)

    def record(self):
        peaks = self.peaks.setdefault(self.phase, {})
        for name, value in status().items():
            if name != 'VmHWM':
                peaks[name] = max(peaks.get(name, 0), value)

    def enter(self, phase):
        self.record()
        self.phase = phase
        self.record()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.record()
        return {'phases': self.peaks, 'VmHWM': status()['VmHWM']}


def run_stage(args, marks):
    """In the stage's process: run the command ``args`` with the sampler,
    the phase switching to ``finalize`` inside ``StoreWriter.finalize`` and
    to ``evaluate`` inside the evaluation of a test store."""
    from gradnet_cupy import cli
    from gradnet_cupy.gradnet import sources
    from gradnet_cupy.store import StoreWriter

    sampler = Sampler()
    sampler.enter(args[0])

    def marked(function, phase):
        def wrapper(*a, **k):
            before = sampler.phase
            sampler.enter(phase)
            try:
                return function(*a, **k)
            finally:
                sampler.enter(before)
        return wrapper

    StoreWriter.finalize = marked(StoreWriter.finalize, 'finalize')
    sources.evaluate_candidates = marked(sources.evaluate_candidates,
                                         'evaluate')
    started = time.perf_counter()
    cli.main(args, standalone_mode=False)
    result = sampler.stop()
    result['seconds'] = time.perf_counter() - started
    Path(marks).write_text(json.dumps(result))


def finalize_profile(rows, workdir):
    """Peak memory of finalizing a journal of ``rows`` synthetic MLP-sized
    rows (36,600 nonzeros of 244,032 columns each, 'none' compression): the
    journal is written in this process, finalized in a fresh one (a
    ``resume`` + ``finalize`` stage). Run it with ``PYTHONPATH`` set to an
    older checkout to see that one's behaviour."""
    import numpy as np
    from gradnet_cupy.kernels import CSR
    from gradnet_cupy.store import StoreWriter
    n_columns, nnz = 244032, 36600
    path = workdir / 'profile.h5'
    writer = StoreWriter.create(path, n_columns, {}, {'profile': True},
                                total_rows=rows, compression='none')
    rng = np.random.default_rng(0)
    columns = np.sort(rng.choice(n_columns, nnz, replace=False))
    for start in range(0, rows, 100):
        count = min(100, rows - start)
        writer.append(
            CSR(np.arange(count + 1, dtype=np.int64) * nnz,
                np.tile(columns.astype(np.int32), count),
                rng.standard_normal(count * nnz).astype(np.float32),
                (count, n_columns)),
            np.arange(start, start + count), np.zeros(count, np.int16),
            np.zeros(count, np.int16))
    writer.close()
    journal_bytes = os.path.getsize(f'{path}.partial')
    marks = workdir / 'profile.memory.json'
    subprocess.run([sys.executable, __file__, '--finalize', str(path),
                    '--marks', str(marks)], check=True)
    report = json.loads(marks.read_text())
    report['journal_bytes'] = journal_bytes
    return report


def run_finalize(path, marks):
    """In a fresh process: resume the journal of ``path`` and finalize it
    under the sampler."""
    from gradnet_cupy.store import StoreWriter
    sampler = Sampler()
    writer, _ = StoreWriter.resume(path, {'profile': True})
    sampler.enter('finalize')
    writer.finalize()
    result = sampler.stop()
    result['code'] = str(Path(sys.modules['gradnet_cupy'].__file__).parent)
    Path(marks).write_text(json.dumps(result))


def stage(name, args, workdir):
    """Run one stage in a fresh process; its memory report."""
    marks = workdir / f'{name}.memory.json'
    command = [sys.executable, __file__, '--stage', json.dumps(args),
               '--marks', str(marks)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(marks.read_text())
    report['command'] = 'gradnet-cupy ' + ' '.join(args)
    print(f"{name}: peak {report['VmHWM'] / 1e6:.0f} MB "
          + ', '.join(f"{phase} {p['VmRSS'] / 1e6:.0f} MB (file "
                      f"{p['RssFile'] / 1e6:.0f})"
                      for phase, p in report['phases'].items()
                      if phase != 'start'), flush=True)
    return report


def measure(subset, base, data, batch, workdir):
    """The stages at ``--subset subset``: a dict of stage reports and the
    store sizes."""
    folder = workdir / f'subset-{subset}'
    folder.mkdir()
    common = data + ['--subset', str(subset), '--batch', str(batch)]
    model = ['--model', str(base), '--arch', 'mlp']
    stores = {'train': folder / 'train.h5', 'test': folder / 'test.h5'}
    reports = {
        'extract_train': stage(f'extract train {subset}', [
            'extract', *model, *common, '--split', 'gradnet',
            '--candidates', 'random', '--out', str(stores['train'])],
            workdir),
        'extract_test': stage(f'extract test {subset}', [
            'extract', *model, *common, '--split', 'test',
            '--candidates', 'all', '--out', str(stores['test'])], workdir),
        'fit': stage(f'fit {subset}', [
            'fit', '--train', str(stores['train']), '--test',
            str(stores['test']), '--epochs', '1', '--out',
            str(folder / 'gradnet')], workdir),
        'evaluate': stage(f'evaluate {subset}', [
            'evaluate', '--gradnet', str(folder / 'gradnet'), '--test',
            str(stores['test'])], workdir)}
    from gradnet_cupy.store import TangentStore
    sizes = {}
    for name, path in stores.items():
        with TangentStore.open(path) as store:
            sizes[name] = {'rows': len(store), 'nnz': store.nnz,
                           'file_bytes': os.path.getsize(path),
                           'journal_bytes': 8 * store.nnz + 20 * len(store)}
    shutil.rmtree(folder)
    return {'subset': subset, 'stores': sizes, 'stages': reports,
            'peak_bytes': max(r['VmHWM'] for r in reports.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--subsets', default='5,50,500',
                        help='samples per split: S training rows, 10 S test '
                             'rows')
    parser.add_argument('--dataset', default='mnist')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--base-subset', type=int, default=1000)
    parser.add_argument('--extract-batch', type=int, default=4,
                        help='extract --batch: samples per tangent batch '
                             '(small, so that the smallest size already '
                             'fills whole batches)')
    parser.add_argument('--workdir', default=None,
                        help='where the stores go (default: a temporary '
                             'folder; needs ~6 GB per 1,000 of subset)')
    parser.add_argument('--out', default=None,
                        help='default: bench/results/memory-cpu.json')
    parser.add_argument('--finalize-profile', type=int, default=None,
                        metavar='ROWS',
                        help='only profile the finalize of a synthetic '
                             'journal of ROWS rows (~293 KB each); prints '
                             'its report')
    parser.add_argument('--stage', help=argparse.SUPPRESS)
    parser.add_argument('--finalize', help=argparse.SUPPRESS)
    parser.add_argument('--marks', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return run_stage(json.loads(args.stage), args.marks)
    if args.finalize:
        return run_finalize(args.finalize, args.marks)
    if args.finalize_profile:
        workdir = Path(tempfile.mkdtemp(prefix='bench_memory_',
                                        dir=args.workdir))
        try:
            print(json.dumps(finalize_profile(args.finalize_profile,
                                              workdir)))
        finally:
            shutil.rmtree(workdir)
        return None

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix='bench_memory_',
                                    dir=args.workdir))
    data = ['--dataset', args.dataset] + (
        ['--data-dir', args.data_dir] if args.data_dir else [])
    try:
        stage('train-base', ['train-base', '--model', 'mlp', '--epochs',
                             '1', *data, '--subset', str(args.base_subset),
                             '--out', str(workdir / 'base')], workdir)
        base = workdir / 'base' / 'snapshot_epoch_1.npz'
        results = [measure(int(s), base, data, args.extract_batch, workdir)
                   for s in args.subsets.split(',')]
    finally:
        shutil.rmtree(workdir)
    peaks = [r['peak_bytes'] for r in results]
    report = {
        'benchmark': 'memory',
        'command': ' '.join([Path(sys.executable).name] + sys.argv),
        'device': 'cpu', 'device_name': device_name('cpu'),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        'seconds': time.perf_counter() - started,
        'versions': {'gradnet_cupy': gradnet_cupy.__version__,
                     'python': platform.python_version()},
        'model': 'mlp (244,032 weights), q = 85, scale_power, 1 epoch',
        'dataset': args.dataset, 'extract_batch': args.extract_batch,
        'goal_peak_growth': 1.5,
        'peak_growth': peaks[-1] / peaks[0],
        'results': results}
    out = Path(args.out or result_path('memory', 'cpu'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + '\n')
    print(f'peak growth {peaks[-1] / peaks[0]:.2f}x; wrote {out}')


if __name__ == '__main__':
    main()
