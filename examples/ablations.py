"""Ablations of GradNet's settings against its base (seed 000 appendix,
talk 002): the sparsification percentile q, no sparsification, GradNet's
structure and wiring, normalizations (fitted on the training rows or on a
held-out validation split), and random vs all candidates for the training
rows.

One base network (``--arch``, ``--base-epochs`` on the base split) and one
seed for everything. Every setting extracts with the package
(``extract_to_store``: tangents, per-layer percentile sparsification,
store) and fits GradNet (``fit_stores``: ``scale_power``, plain SGD lr
0.01, batch 25, ``--gradnet-epochs``, evaluated with all candidates on the
test store). Settings that only change GradNet share the q = 85 stores.

- ``q``: the training and test stores extracted at each q of ``--qs``;
  ``none`` there is no sparsification, extracted at ``q = 1e-6``: every
  nonzero gradient entry is kept but at most the smallest one of a layer
  (``percentile_sparsify`` needs ``0 < q < 100``; ``q -> 0`` keeps every
  entry above the smallest magnitude, and a ReLU network's zeros are
  below it);
- ``structure``: hidden units per base layer block (``--structures``,
  e.g. ``5,25,10`` and ``20,400,100`` for the cnn's three layers; ``auto``:
  130 in proportion to the blocks), each with every wiring of
  ``--wirings`` (diagonal and adjacent);
- ``normalization``: on the q = 85 stores, GradNet with each method of
  ``--normalizations`` fitted on the training rows (``metric-diagonal``:
  the diagonal ``G^{-1/2}``, i.e. ``metric`` with the diagonal partition,
  whose column scales have a per-layer floor:
  ``gradnet_cupy.normalize.metric.layer_floored``;
  ``metric``: per-unit blocks of at most 256 columns), and each method of
  ``--validation-normalizations`` fitted instead on a held-out validation
  split: ``--validation`` gradnet digits that follow the ``--subset``
  training digits (never trained on), extracted like the training rows
  (one random candidate each) into their own store
  (``NormalizeOptions.fit_store``, ``fit --normalize-store``);
- ``candidates``: the training rows with one random candidate per sample
  (the default) or every class as a candidate (C times the rows).

Data: ``--subset N`` keeps the first N digits of the base and gradnet
splits, ``--test-subset M`` the first M test digits (default N); the
validation digits are gradnet digits N .. N + V - 1.

The base is trained into ``--out/base`` unless that folder holds one
already or ``--base DIR`` names a base folder to use instead. Stores are
written into ``--out`` and deleted after use (unless
``--keep-stores``); a finished store of the same
extraction found there (same snapshot file, settings and data) is used as
it is (``StoreWriter.create_or_resume``), so runs that share ``--base``
can share stores through hard links into their ``--out``.

Writes ``--out/ablations.json`` (settings, data sizes, every row with its
accuracy, store sizes, wall and CPU seconds; rewritten after every row,
``finished`` false until the end) and ``ablations.rst`` (the tables) and
``accuracy_vs_q.png``; prints the tables.

Example (the embedded MNIST, a subset)::

    python examples/ablations.py --dataset mnist --subset 600 --out runs/ablations
"""
import argparse
import dataclasses
import json
import os
import time

from gradnet_cupy import gradnet
from gradnet_cupy.data import load_dataset
from gradnet_cupy.extract import extract_to_store, model_provenance
from gradnet_cupy.files import atomic_write
from gradnet_cupy.options import (MetricOptions, NetOptions,
                                  NormalizeOptions, TrainOptions)
from gradnet_cupy.tangent import parameter_layout
from gradnet_cupy.train_base import load_base, train_base

NO_SPARSIFICATION_Q = 1e-6
NOT_EXTRACTED = (0.0, 0.0)    # (wall, CPU) seconds of a row on reused stores
PARTS = ('q', 'structure', 'normalization', 'candidates')
# --normalizations names beyond the package's methods
NORMALIZATIONS = {'metric-diagonal': NormalizeOptions(
    'metric', metric=MetricOptions(partition='diagonal'))}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='mnist')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--subset', type=int, default=None,
                        help='Keep the first N samples of the base and '
                             'gradnet splits (and of test, without '
                             '--test-subset).')
    parser.add_argument('--test-subset', type=int, default=None,
                        help='Keep the first M test samples.')
    parser.add_argument('--validation', type=int, default=None,
                        help='Held-out validation digits for the '
                             'normalization part (default: half of the '
                             'gradnet digits used, at most what is left).')
    parser.add_argument('--normalizations',
                        default='none,standard,scale_power,metric-diagonal',
                        help='Fitted on the training rows.')
    parser.add_argument('--validation-normalizations',
                        default='scale_power,metric-diagonal',
                        help='Fitted on the validation rows.')
    parser.add_argument('--arch', default='cnn')
    parser.add_argument('--base-epochs', type=int, default=1)
    parser.add_argument('--gradnet-epochs', type=int, default=3)
    parser.add_argument('--base', default=None, metavar='DIR',
                        help='Use the base trained into DIR (its last '
                             'snapshot) instead of --out/base.')
    parser.add_argument('--qs', default='99,95,90,85,80,70,none',
                        help='Comma-separated percentiles and "none" (no '
                             'sparsification).')
    parser.add_argument('--structures', default='auto,5,25,10,20,400,100',
                        help='Comma-separated: "auto" and groups of as '
                             'many integers as the base has layers.')
    parser.add_argument('--wirings', default='diagonal,adjacent',
                        help='The wirings of the structure part.')
    parser.add_argument('--keep-stores', action='store_true',
                        help='Keep the stores in --out after use.')
    parser.add_argument('--parts', default=','.join(PARTS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--combine', nargs='+', default=None,
                        metavar='ABLATIONS_JSON',
                        help='Only draw accuracy_vs_q.png into --out from '
                             'these runs\' ablations.json (one line per '
                             'run), running nothing.')
    parser.add_argument('--out', required=True)
    return parser.parse_args(argv)


def parse_structures(text, n_blocks):
    """'auto,5,25,10' -> [None, (5, 25, 10)] for ``n_blocks`` blocks."""
    items = text.split(',')
    out, numbers = [], []
    for item in items:
        if item == 'auto':
            out.append(None)
        else:
            numbers.append(int(item))
            if len(numbers) == n_blocks:
                out.append(tuple(numbers))
                numbers = []
    if numbers:
        raise SystemExit(f'--structures: {numbers} is not a group of '
                         f'{n_blocks} integers')
    return out


def split_data(full, args):
    """``(data, validation)``: ``full`` (a Dataset) with the first
    ``--subset`` base and gradnet samples and the first ``--test-subset``
    test samples, and the validation split ``(x, y)``: the ``--validation``
    gradnet samples after those (None when the normalization part fits
    nothing on validation rows)."""
    n = args.subset or len(full.gradnet[1])
    data = dataclasses.replace(
        full, base=head(full.base, 0, n), gradnet=head(full.gradnet, 0, n),
        test=head(full.test, 0, args.test_subset or args.subset))
    if 'normalization' not in args.parts.split(',') \
            or not args.validation_normalizations:
        return data, None
    v = args.validation or n // 2
    if n + v > len(full.gradnet[1]):
        raise SystemExit(
            f'--validation {v}: the gradnet split has {len(full.gradnet[1])} '
            f'samples, {n} of them train GradNet; use a smaller --subset '
            'or --validation')
    return data, head(full.gradnet, n, n + v)


def head(split, start, stop):
    x, y = split
    return x[start:stop], y[start:stop]


def parse_qs(text):
    """'90,none' -> [90.0, NO_SPARSIFICATION_Q]."""
    try:
        return [NO_SPARSIFICATION_Q if q == 'none' else float(q)
                for q in text.split(',')]
    except ValueError:
        raise SystemExit(f'--qs: {text!r} is not a comma-separated list of '
                         'percentiles and "none"') from None


class Clock:
    """Wall and CPU seconds (of this process, all threads) since it was
    made: ``clock.seconds() -> (wall, cpu)``."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def seconds(self):
        return time.time() - self.wall, time.process_time() - self.cpu


class Runner:
    """Extracts stores and fits GradNet for one base snapshot."""

    def __init__(self, args, data, base, layout, record):
        self.args, self.data, self.base = args, data, base
        self.layout, self.record = layout, record

    def stores(self, q, train_candidates='random',
               splits=('gradnet', 'test')):
        """({split: store path}, {train_rows, train_density, test_rows,
        test_density}, (wall, CPU) seconds) of the ``splits`` extracted at
        ``q``."""
        clock = Clock()
        paths, sizes = {}, {}
        for split, candidates in (('gradnet', train_candidates),
                                  ('test', 'all')):
            if split not in splits:
                continue
            name = 'train' if split == 'gradnet' else split
            paths[split], sizes[f'{name}_rows'], \
                sizes[f'{name}_density'] = self.extract(
                    split, getattr(self.data, split), candidates, q)
        return paths, sizes, clock.seconds()

    def extract(self, split, samples, candidates, q):
        """(store path, rows, density) of ``samples`` (``(x, y)``, called
        ``split`` in the store's name and provenance) extracted at ``q``."""
        path = os.path.join(self.args.out, f'{split}-q{q:g}-{candidates}.h5')
        summary = extract_to_store(
            self.base, self.layout, samples, self.data.n_classes, path,
            model_provenance(self.record['path'], self.args.arch,
                             self.args.dataset, split, self.args.data_dir,
                             len(samples[1])),
            candidates=candidates, q=q, seed=self.args.seed,
            device=self.args.device, transform=self.data.eval_transform,
            progress=False, compression='lzf')
        return path, summary['rows'], round(summary['density'], 4)

    def fit(self, paths, hidden=None, wiring='diagonal',
            normalize=NormalizeOptions()):
        """(test accuracy, hidden sizes, (wall, CPU) seconds)."""
        clock = Clock()
        model, _, history = gradnet.fit_stores(
            paths['gradnet'], paths['test'], normalize,
            NetOptions(hidden=hidden, wiring=wiring, seed=self.args.seed),
            TrainOptions(epochs=self.args.gradnet_epochs, eval_every=0,
                         seed=self.args.seed),
            self.args.device, progress=False)
        return (history[-1]['test_accuracy'], list(model.hidden_sizes),
                clock.seconds())


def remove(paths, args):
    """Deletes the stores ``paths`` (a dict of paths) unless
    ``--keep-stores``."""
    if not args.keep_stores:
        for path in paths.values():
            os.remove(path)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.combine:
        results = []
        for path in args.combine:
            with open(path) as f:
                results.append(json.load(f))
        return plot_q(args.out, results)
    clock = Clock()
    qs = parse_qs(args.qs)
    data, validation = split_data(
        load_dataset(args.dataset, args.data_dir), args)
    base_folder = args.base or os.path.join(args.out, 'base')
    if not os.path.exists(os.path.join(base_folder, 'snapshots.json')):
        if args.base:
            raise SystemExit(f'--base {args.base}: no base was trained '
                             'there (no snapshots.json)')
        train_base(data, args.arch, base_folder, epochs=args.base_epochs,
                   seed=args.seed, device=args.device, progress=False)
    base, _, record = load_base(base_folder, device=args.device)
    layout = parameter_layout(base)
    runner = Runner(args, data, base, layout, record)
    parts = args.parts.split(',')
    if 85.0 not in qs and {'structure', 'normalization',
                           'candidates'} & set(parts):
        qs.append(85.0)
    rows = []
    result = {'settings': vars(args), 'base_test_accuracy':
              record['test_accuracy'], 'base_snapshot': record['path'],
              'data': {**{split: len(getattr(data, split)[1])
                          for split in ('base', 'gradnet', 'test')},
                       'validation': 0 if validation is None
                       else len(validation[1])},
              'finished': False, 'rows': rows}

    def add(part, setting, paths, sizes, extract_s, **fit_args):
        accuracy, hidden, fit_s = runner.fit(paths, **fit_args)
        rows.append({'part': part, 'setting': setting, 'gradnet': accuracy,
                     'hidden_sizes': hidden, **sizes,
                     'extract_s': round(extract_s[0], 1),
                     'extract_cpu_s': round(extract_s[1], 1),
                     'fit_s': round(fit_s[0], 1),
                     'fit_cpu_s': round(fit_s[1], 1)})
        print(json.dumps(rows[-1]), flush=True)
        write_json(args.out, result)

    for q in qs:
        wanted = (q == 85.0 and {'structure', 'normalization',
                                 'candidates'} & set(parts)) or 'q' in parts
        if not wanted:
            continue
        paths, sizes, extract_s = runner.stores(q)
        name = 'none' if q == NO_SPARSIFICATION_Q else f'q = {q:g}'
        if 'q' in parts:
            add('q', name, paths, sizes, extract_s)
        if q == 85.0 and 'structure' in parts:
            for hidden in parse_structures(args.structures,
                                           len(layout.block_sizes)):
                for wiring in args.wirings.split(','):
                    label = 'auto 130' if hidden is None else '+'.join(
                        map(str, hidden))
                    add('structure', f'{label}, {wiring}', paths, sizes,
                        NOT_EXTRACTED, hidden=hidden, wiring=wiring)
        if q == 85.0 and 'normalization' in parts:
            normalization_rows(runner, add, args, paths, sizes, validation)
        if q == 85.0 and 'candidates' in parts:
            add('candidates', 'random (1 per sample)', paths, sizes,
                NOT_EXTRACTED)
            train, train_sizes, train_s = runner.stores(q, 'all', ('gradnet',))
            add('candidates', 'all (C per sample)',
                dict(paths, **train), dict(sizes, **train_sizes), train_s)
            remove(train, args)
        remove(paths, args)
    wall, cpu = clock.seconds()
    result.update(finished=True, wall_s=round(wall, 1), cpu_s=round(cpu, 1))
    write(args.out, result)
    return result


def normalization_rows(runner, add, args, paths, sizes, validation):
    """The normalization part on the q = 85 stores: each method of
    ``--normalizations`` fitted on the training rows, then each of
    ``--validation-normalizations`` fitted on the validation split's store
    (extracted here, removed after)."""
    def options(name, fit_store=None):
        return dataclasses.replace(
            NORMALIZATIONS.get(name) or NormalizeOptions(name),
            fit_store=fit_store)

    for name in filter(None, args.normalizations.split(',')):
        add('normalization', f'{name}, training rows', paths, sizes,
            NOT_EXTRACTED, normalize=options(name))
    names = list(filter(None, args.validation_normalizations.split(',')))
    if not names:
        return
    clock = Clock()
    path, rows, density = runner.extract('validation', validation, 'random',
                                         85.0)
    extract_s = clock.seconds()
    for name in names:
        add('normalization', f'{name}, validation rows ({rows:,})', paths,
            dict(sizes, validation_rows=rows, validation_density=density),
            extract_s, normalize=options(name, path))
        extract_s = NOT_EXTRACTED
    remove({'validation': path}, args)


def write_json(out, result):
    """``out/ablations.json`` of ``result``, replaced atomically."""
    atomic_write(os.path.join(out, 'ablations.json'), lambda f: f.write(
        json.dumps(result, indent=1).encode()))


def write(out, result):
    write_json(out, result)
    base = result['base_test_accuracy']
    head = ('part', 'setting', 'GradNet', 'vs base', 'train rows',
            'train density', 'test rows', 'extract s', 'extract CPU s',
            'fit s', 'fit CPU s')
    table = [head] + [(
        r['part'], r['setting'], f"{r['gradnet']:.4f}",
        f"{r['gradnet'] - base:+.4f}", f"{r['train_rows']:,}",
        f"{r['train_density']:.4f}", f"{r['test_rows']:,}",
        f"{r['extract_s']:.0f}", f"{r['extract_cpu_s']:.0f}",
        f"{r['fit_s']:.0f}", f"{r['fit_cpu_s']:.0f}")
        for r in result['rows']]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    rule = '  '.join('=' * w for w in widths)
    lines = [rule, '  '.join(v.ljust(w) for v, w in zip(head, widths)),
             rule]
    lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
              for row in table[1:]]
    lines.append(rule)
    text = '\n'.join(lines)
    with open(os.path.join(out, 'ablations.rst'), 'w') as f:
        f.write(text + '\n')
    print(f'base test accuracy {base:.4f}; data {result["data"]}; '
          f'wall {result["wall_s"]} s, CPU {result["cpu_s"]} s')
    print(text)
    plot_q(out, [result])


def plot_q(out, results):
    """``accuracy_vs_q.png`` in ``out``: GradNet's test accuracy against q
    of each result (an ``ablations.json`` dict) with a 'q' part, its
    no-sparsification accuracy and its base as horizontal lines in the
    same colour; labelled by dataset and seed when there are several."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    results = [r for r in results
               if any(row['part'] == 'q' for row in r['rows'])]
    if not results:
        return
    fig, ax = plt.subplots(figsize=(9 if len(results) > 1 else 6, 4.5))
    for i, result in enumerate(results):
        rows = [r for r in result['rows'] if r['part'] == 'q']
        settings = result['settings']
        name = f"{settings['dataset']}, seed {settings['seed']}: " \
            if len(results) > 1 else ''
        colour = f'C{i}'
        swept = sorted((float(r['setting'].split('= ')[1]), r['gradnet'])
                       for r in rows if r['setting'] != 'none')
        ax.plot(*zip(*swept), 'o-', color=colour, label=f'{name}GradNet')
        for r in rows:
            if r['setting'] == 'none':
                ax.axhline(r['gradnet'], color=colour, ls='--',
                           label=f'{name}no sparsification')
        ax.axhline(result['base_test_accuracy'], color=colour, ls=':',
                   label=f'{name}base')
    ax.set_xlabel('sparsification percentile q')
    ax.set_ylabel('test accuracy (all candidates)')
    ax.legend(fontsize='small', loc='center left', bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'accuracy_vs_q.png'), dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    main()
