"""Base accuracy vs GradNet accuracy over base snapshots of increasing
accuracy: the protocol of Table 2 of the GradNet paper.

The base network is trained on the base half with a small learning rate so
that its per-epoch snapshots span weak to better accuracies. For every
snapshot: tangent features of the gradnet half (one random candidate per
sample) and of the test split (all candidates) are extracted into stores,
GradNet is fitted (plain SGD lr 0.01, batch 25, as in the paper) once per
normalization of --normalize (default scale_power, the paper's best) and
evaluated with the all-candidates rule.

Writes into --out: table.json, table.rst and base_vs_gradnet.png.

Examples (the embedded 5,000 MNIST digits)::

    python examples/reproduce_table.py --dataset mnist --out runs/table-mnist
    python examples/reproduce_table.py --dataset mnist \
        --normalize scale_power,metric --out runs/normalizations-mnist
"""
import argparse
import json
import os

from gradnet_cupy import gradnet
from gradnet_cupy.data import load_dataset
from gradnet_cupy.extract import extract_to_store, model_provenance
from gradnet_cupy.options import (
    MetricOptions, NetOptions, NormalizeOptions, TrainOptions)
from gradnet_cupy.tangent import parameter_layout
from gradnet_cupy.train_base import load_base, train_base


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='mnist')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--subset', type=int, default=None)
    parser.add_argument('--arch', default='cnn')
    parser.add_argument('--base-epochs', type=int, default=4)
    parser.add_argument('--base-lr', type=float, default=0.002)
    parser.add_argument('--snapshots', default=None,
                        help='Comma-separated epochs to use (default: all).')
    parser.add_argument('--gradnet-epochs', type=int, default=3)
    parser.add_argument('--hidden', default=None,
                        help='Hidden units per block, e.g. 5,100,25 '
                             '(default: 130 in proportion to the blocks).')
    parser.add_argument('--q', type=float, default=85.0)
    parser.add_argument('--normalize', default='scale_power',
                        help='Comma-separated normalizations to fit on the '
                             'same stores, e.g. scale_power,metric.')
    parser.add_argument('--metric-partition', default='per_unit')
    parser.add_argument('--metric-max-block', type=int, default=256)
    parser.add_argument('--metric-damping', type=float, default=1e-3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--out', required=True)
    return parser.parse_args()


def main():
    args = parse_args()
    data = load_dataset(args.dataset, args.data_dir, args.subset)
    base_folder = os.path.join(args.out, 'base')
    if not os.path.exists(os.path.join(base_folder, 'snapshots.json')):
        train_base(data, args.arch, base_folder, epochs=args.base_epochs,
                   lr=args.base_lr, optimizer='sgd', seed=args.seed,
                   device=args.device)
    epochs = (range(1, args.base_epochs + 1) if args.snapshots is None
              else [int(e) for e in args.snapshots.split(',')])
    hidden = (None if args.hidden is None
              else [int(h) for h in args.hidden.split(',')])
    rows = []
    for epoch in epochs:
        base, _, record = load_base(base_folder, epoch, args.device)
        layout = parameter_layout(base)
        stores = {}
        for split, candidates in (('gradnet', 'random'), ('test', 'all')):
            stores[split] = os.path.join(args.out, f'epoch{epoch}-{split}.h5')
            extract_to_store(
                base, layout, getattr(data, split), data.n_classes,
                stores[split],
                model_provenance(record['path'], args.arch, args.dataset,
                                 split, args.data_dir, args.subset),
                candidates=candidates, q=args.q, seed=args.seed,
                device=args.device, transform=data.eval_transform,
                compression='lzf')
        accuracy = {}
        for normalize in args.normalize.split(','):
            model, normalizer, history = gradnet.fit_stores(
                stores['gradnet'], stores['test'],
                NormalizeOptions(normalize, 0.5, MetricOptions(
                    args.metric_partition, args.metric_max_block,
                    args.metric_damping)),
                NetOptions(hidden=hidden, seed=args.seed),
                TrainOptions(epochs=args.gradnet_epochs, eval_every=0,
                             seed=args.seed),
                args.device, progress=True)
            gradnet.save_fit(gradnet.FitFolder(
                os.path.join(args.out, f'epoch{epoch}-gradnet-{normalize}'),
                vars(args), overwrite=True), model, normalizer, history)
            accuracy[normalize] = history[-1]['test_accuracy']
        rows.append({'epoch': epoch, 'base': record['test_accuracy'],
                     'gradnet': accuracy,
                     'hidden_sizes': model.hidden_sizes})
        for split in stores.values():   # keep the disk use to one snapshot
            os.remove(split)
        write_table(args, rows)


def write_table(args, rows):
    with open(os.path.join(args.out, 'table.json'), 'w') as f:
        json.dump({'settings': vars(args), 'rows': rows}, f, indent=1)
    normalizations = list(rows[0]['gradnet'])
    rule = '  '.join(['=' * 10, '=' * 8] + ['=' * 20] * len(normalizations))
    lines = [rule, '  '.join(['base epoch', 'base    '] + [
        f'GradNet {n}'.ljust(20) for n in normalizations]).rstrip(), rule]
    for r in rows:
        cells = [f"{r['epoch']:<10d}", f"{r['base']:.4f}  "]
        for n in normalizations:
            accuracy = r['gradnet'][n]
            gain = (accuracy / r['base'] - 1) * 100
            cells.append(f'{accuracy:.4f} ({gain:+.1f}%)'.ljust(20))
        lines.append('  '.join(cells).rstrip())
    lines.append(rule)
    with open(os.path.join(args.out, 'table.rst'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for n in normalizations:
        ax.plot([r['base'] for r in rows], [r['gradnet'][n] for r in rows],
                'o-', label=f'GradNet ({n})')
    low = min(min(r['base'], *r['gradnet'].values()) for r in rows)
    ax.plot([low, 1], [low, 1], 'k:', label='equal to base')
    ax.set_xlabel('base network test accuracy')
    ax.set_ylabel('GradNet test accuracy')
    ax.set_title(f'{args.dataset} {args.arch}')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'base_vs_gradnet.png'), dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    main()
