"""Fisher-vector features of an RBM against its hidden activations: the
protocol of Table 1 of the GradNet paper (seed 000).

For every hidden size of --hidden, a Bernoulli RBM is trained by CD-1 on
the base split (binarized at --binarize). Two states are evaluated:
"initialization" (a short CD run, --init-epochs, on the first 1,000 base
digits) and "trained" (that RBM trained on for --epochs over the whole base
split). For each state, linear models (the package's linear head, ``fit
--hidden 0``: logistic regression) are trained on the gradnet split and
evaluated on the test split, on

* ``p(h|v)``: the RBM's hidden activations, each column standardized
  (``standard``, fitted on the gradnet split);
* gradient features: per-sample Fisher scores ``E_model[grad F] - grad F(v)``
  (the expectation from the default Gibbs chains: 100 chains x 10 samples
  after 1,000 sweeps), scaled by the diagonal Fisher approximation fitted
  on the gradnet split, sparsified per layer at --q and normalized by
  --normalize (fitted on the gradnet split);

and, as a fifth column, GradNet (130 hidden units) on the gradient
features. Both linear models and GradNet use the same optimizer settings.

Writes <out>/table.json and <out>/table.rst; --json prints one JSON object
per row on stdout.

Example (the embedded 5,000 MNIST digits)::

    python examples/rbm_table.py --out runs/rbm-table
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.sparse

from gradnet_cupy import gradnet
from gradnet_cupy.data import load_dataset
from gradnet_cupy.kernels import CSR, percentile_sparsify
from gradnet_cupy.normalize import (
    ColumnNormalizer, ColumnStats, TrainingFeatures, fit_normalizer)
from gradnet_cupy.options import NetOptions, NormalizeOptions
from gradnet_cupy.rbm import (
    RBM, DiagonalFisher, binarize, fisher_scores, model_expectation,
    rbm_layout, train_rbm)

INIT_SAMPLES = 1000
CHUNK = 250     # samples per Fisher-score computation


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--hidden', default='16,64',
                        help='Comma-separated RBM hidden sizes.')
    parser.add_argument('--dataset', default='mnist')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--subset', type=int, default=None)
    parser.add_argument('--binarize', type=float, default=0.5)
    parser.add_argument('--init-epochs', type=int, default=5,
                        help='CD epochs over the first 1,000 base digits.')
    parser.add_argument('--epochs', type=int, default=20,
                        help='Further CD epochs over the base split.')
    parser.add_argument('--cd-lr', type=float, default=0.05)
    parser.add_argument('--q', type=float, default=85.0)
    parser.add_argument('--normalize', default='scale_power')
    parser.add_argument('--linear-epochs', type=int, default=20)
    parser.add_argument('--optimizer', default='adam')
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--batch', type=int, default=25)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', required=True)
    parser.add_argument('--json', action='store_true',
                        help='One JSON object per row on stdout.')
    return parser.parse_args()


def to_csr(matrix):
    """A package CSR (float32 data, int32 indices) of a SciPy matrix."""
    m = scipy.sparse.csr_matrix(matrix, dtype=np.float32)
    return CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
               m.data, m.shape)


def fit_linear(train, test, block_sizes, n_classes, args, hidden=(0,)):
    """Train the linear head (``hidden=(0,)``) or GradNet on SciPy CSR
    features; returns the test accuracy (one row per sample: argmax)."""
    (xtr, ytr), (xte, yte) = train, test
    model = gradnet.build_gradnet(
        block_sizes, n_classes,
        NetOptions(None if hidden is None else hidden, seed=args.seed))
    optimizer = gradnet.make_optimizer(model, args.optimizer, args.lr)
    rng = np.random.default_rng(args.seed)

    def epoch_batches(epoch):
        order = rng.permutation(xtr.shape[0])
        for start in range(0, len(order), args.batch):
            rows = order[start:start + args.batch]
            yield to_csr(xtr[rows]), ytr[rows].astype(np.int32)

    def evaluate():
        return gradnet.evaluate_candidates(
            model, [(to_csr(xte), np.arange(xte.shape[0]), yte)])[0]

    history = gradnet.train(model, optimizer, args.linear_epochs,
                            epoch_batches, evaluate, eval_every=0,
                            progress=False)
    return history[-1]['test_accuracy']


def gradient_features(rbm, layout, splits, args):
    """Fisher scores of the gradnet and test splits, diagonal-Fisher scaled
    (fitted on gradnet), sparsified and normalized: two SciPy CSR."""
    centre = model_expectation(rbm, layout, seed=args.seed)[0]

    def chunks(v):
        for start in range(0, len(v), CHUNK):
            yield fisher_scores(rbm, v[start:start + CHUNK], centre, layout)

    fisher = DiagonalFisher.fit(chunks(splits[0]))
    sparse = [[percentile_sparsify(
        fisher.apply(s).astype(np.float32), layout.block_sizes, args.q)
        for s in chunks(v)] for v in splits]
    stacked = [scipy.sparse.vstack([c.to_scipy() for c in parts]).tocsr()
               for parts in sparse]
    normalizer = fit_normalizer(
        TrainingFeatures(layout, args.q,
                         lambda: iter(sparse[0]), 'cpu', None, None),
        NormalizeOptions(args.normalize))
    return [normalizer(to_csr(m)).to_scipy() for m in stacked]


def evaluate_state(rbm, data_v, labels, n_classes, args):
    """The row's accuracies for one RBM state."""
    layout = rbm_layout(rbm)
    hidden = [to_csr(rbm.hidden_probabilities(v)) for v in data_v]
    standard = ColumnNormalizer.from_stats(
        ColumnStats(rbm.n_hidden).add(hidden[0]).as_dict(), [rbm.n_hidden],
        NormalizeOptions('standard'))
    hidden = [standard(h).to_scipy() for h in hidden]
    grads = gradient_features(rbm, layout, data_v, args)
    return {
        'p_h_given_v': fit_linear((hidden[0], labels[0]),
                                  (hidden[1], labels[1]),
                                  [rbm.n_hidden], n_classes, args),
        'gradients': fit_linear((grads[0], labels[0]),
                                (grads[1], labels[1]),
                                layout.block_sizes, n_classes, args),
        'gradnet': fit_linear((grads[0], labels[0]), (grads[1], labels[1]),
                              layout.block_sizes, n_classes, args,
                              hidden=None),
        'n_features': layout.n_params}


def main():
    args = parse_args()
    data = load_dataset(args.dataset, args.data_dir, args.subset)

    def visible(split):
        return binarize(data.eval_transform(split[0]),
                        args.binarize).astype(np.float64)

    base = visible(data.base)
    splits = [visible(data.gradnet), visible(data.test)]
    labels = [np.asarray(data.gradnet[1]), np.asarray(data.test[1])]
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for n_hidden in (int(h) for h in args.hidden.split(',')):
        rbm = RBM(base.shape[1], n_hidden, seed=args.seed, dtype=np.float64)
        states = (('initialization', base[:INIT_SAMPLES], args.init_epochs),
                  ('trained', base, args.epochs))
        for state, v, epochs in states:
            start = time.time()
            train_rbm(rbm, v, epochs=epochs, lr=args.cd_lr, seed=args.seed)
            row = {'hidden': n_hidden, 'state': state,
                   **evaluate_state(rbm, splits, labels, data.n_classes,
                                    args),
                   'seconds': round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps(row) if args.json else
                  f"{n_hidden:4d} {state:15s} p(h|v) "
                  f"{row['p_h_given_v']:.4f}  gradients "
                  f"{row['gradients']:.4f}  GradNet {row['gradnet']:.4f}",
                  file=sys.stdout if args.json else sys.stderr, flush=True)
    settings = {k: v for k, v in vars(args).items() if k != 'json'}
    with open(os.path.join(args.out, 'table.json'), 'w') as f:
        json.dump({'settings': settings, 'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'table.rst'), 'w') as f:
        f.write(rst_table(rows))
    if not args.json:
        print(rst_table(rows))


def rst_table(rows):
    header = ('RBM hidden units', 'RBM state', 'linear on p(h|v)',
              'linear on gradients', 'GradNet on gradients')
    body = [(str(r['hidden']), r['state'], f"{r['p_h_given_v']:.4f}",
             f"{r['gradients']:.4f}", f"{r['gradnet']:.4f}") for r in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]
    rule = ' '.join('=' * w for w in widths)

    def line(cells):
        return ' '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return '\n'.join([rule, line(header), rule, *map(line, body), rule, ''])


if __name__ == '__main__':
    main()
