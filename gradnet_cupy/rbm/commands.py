"""The RBM's command line: ``gradnet-cupy train-rbm`` (:data:`COMMANDS`,
registered in :mod:`gradnet_cupy.cli`'s main group, which adds the common
``--device/--seed/--json`` options and prints the summary) and what
``extract --arch rbm --objective free-energy`` needs
(:func:`rbm_extraction`).

Neighbours: :mod:`.model`, :mod:`.training`, :mod:`.fisher`;
:mod:`gradnet_cupy.cli` (the shared options and error handling).
"""
import os

import click

from gradnet_cupy.backend import to_device
from gradnet_cupy.data import DATASETS, load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.models import model_to_device
from gradnet_cupy.rbm.fisher import (
    DiagonalFisher, fisher_scores, model_expectation, rbm_layout)
from gradnet_cupy.rbm.model import RBM, binarize, load_rbm, save_rbm
from gradnet_cupy.rbm.training import train_rbm


FISHER_SCALINGS = ('none', 'diagonal')
"""``extract --fisher-scaling``: the centred scores as they are, or scaled
by the diagonal Fisher fitted on the gradnet split (the training rows)."""
FISHER_CHUNK = 256      # samples per score chunk of the diagonal Fisher fit


def rbm_extraction(snapshot, data, device, threshold, seed,
                   fisher_scaling='none'):
    """``(rbm, layout, transform, features_map)`` for extracting an RBM's
    Fisher scores: the RBM of ``snapshot`` on ``device``, its full layout
    (W, c, b), ``transform`` (host images -> binary visible vectors
    (n, V) float32, through the dataset's eval transform and
    :func:`~.model.binarize` at ``threshold``), and ``features_map`` (the
    centring ``E_model[grad F] - grad F``, the expectation from the default
    Gibbs chains of :func:`~.fisher.model_expectation` seeded by ``seed``;
    with ``fisher_scaling='diagonal'`` then multiplied by the
    :class:`~.fisher.DiagonalFisher` fitted on the centred scores of
    ``data``'s gradnet split, whichever split is extracted)."""
    if fisher_scaling not in FISHER_SCALINGS:
        raise GradnetError(f'unknown Fisher scaling {fisher_scaling!r}: '
                           f"choose one of {', '.join(FISHER_SCALINGS)}")
    rbm = model_to_device(load_rbm(snapshot), device)
    if rbm.n_visible != int(data.base[0][0].size):
        raise GradnetError(f'{snapshot}: an RBM with {rbm.n_visible} visible '
                           f'units does not fit images of '
                           f'{data.base[0][0].size} values')
    layout = rbm_layout(rbm)
    centre = rbm.xp.asarray(model_expectation(rbm, layout, seed=seed)[0],
                            dtype=rbm.W.dtype)

    def transform(x):
        return binarize(data.eval_transform(x), threshold)

    if fisher_scaling == 'none':
        return rbm, layout, transform, lambda grads: centre - grads
    x = data.gradnet[0]
    fisher = DiagonalFisher.fit(
        fisher_scores(rbm, to_device(transform(x[start:start + FISHER_CHUNK]),
                                     device), centre, layout)
        for start in range(0, len(x), FISHER_CHUNK))
    return rbm, layout, transform, \
        lambda grads: fisher.apply(centre - grads)


@click.option('--dataset', type=click.Choice(DATASETS), default='mnist',
              show_default=True)
@click.option('--data-dir', default=None,
              help='Dataset folder (default: the embedded MNIST).')
@click.option('--subset', type=int, default=None,
              help='Keep only the first N samples of every split.')
@click.option('--hidden', type=int, default=16, show_default=True,
              help='Hidden units (>= 1).')
@click.option('--binarize', 'threshold', type=float, default=None,
              help='Visible unit = 1 where the image value exceeds this '
                   '(needed unless the data are already 0/1).')
@click.option('--epochs', type=int, default=10, show_default=True)
@click.option('--batch', type=int, default=20, show_default=True)
@click.option('--lr', type=float, default=0.05, show_default=True)
@click.option('--momentum', type=float, default=0.5, show_default=True)
@click.option('--k', type=int, default=1, show_default=True,
              help='Gibbs steps of CD-k.')
@click.option('--persistent', is_flag=True,
              help='Persistent chains (PCD).')
@click.option('--max-samples', type=int, default=None,
              help='Train on the first N base digits only.')
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for rbm.npz and rbm.json.')
def train_rbm_command(dataset, data_dir, subset, hidden, threshold, epochs,
                      batch, lr, momentum, k, persistent, max_samples, out,
                      device, seed):
    """Train a Bernoulli RBM by CD-k on the base split (no labels)."""
    data = load_dataset(dataset, data_dir, subset)
    x = data.base[0] if max_samples is None else data.base[0][:max_samples]
    v = binarize(data.eval_transform(x), threshold)
    rbm = model_to_device(RBM(v.shape[1], hidden, seed=seed), device)
    history = train_rbm(rbm, to_device(v, device), epochs=epochs,
                        batch=batch, lr=lr, momentum=momentum, k=k,
                        persistent=persistent, seed=seed)
    summary = {'out': out, 'n_visible': rbm.n_visible, 'n_hidden': hidden,
               'samples': len(v), 'history': history,
               'reconstruction_error': history[-1]['reconstruction_error']
               if history else None}
    path = save_rbm(out, rbm, {'settings': {
        'dataset': dataset, 'binarize': threshold, 'epochs': epochs,
        'batch': batch, 'lr': lr, 'momentum': momentum, 'k': k,
        'persistent': persistent, 'seed': seed, 'samples': len(v)},
        'summary': summary})
    summary['snapshot'] = path
    return summary, (
        f'RBM {rbm.n_visible}x{hidden} trained on {len(v)} samples, '
        f"reconstruction error {summary['reconstruction_error']}; "
        f'snapshot {os.path.abspath(path)}')


COMMANDS = [('train-rbm', train_rbm_command)]
"""``(name, function)`` of each command: a function carrying its own click
options that takes ``device`` and ``seed`` too and returns ``(summary
dict, one-line report)``; :mod:`gradnet_cupy.cli` registers it with the
common options."""
