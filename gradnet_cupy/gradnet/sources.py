"""Where GradNet's batches come from: a tangent store, or tangents extracted
on the fly (Algorithm 1).

For training: ``epoch -> iterator of (normalized csr, target)``
(:func:`store_batches`, :func:`online_batches`); for the normalizer's fit:
the training features as a
:class:`~gradnet_cupy.normalize.TrainingFeatures`
(:func:`store_training_features`, :func:`online_training_features`); for
evaluation: ``() -> accuracy`` (:func:`store_evaluator`,
:func:`online_evaluator`) over test batches (:func:`store_test_batches`,
:func:`online_test_batches`, the latter for :class:`OnlineTest`: the test
split scored without a test store); the checks that the test data fits the
training features (:func:`snapshot_identity`, :func:`online_identity`,
:func:`check_test_store`, :meth:`OnlineTest.check`). Neighbours: :mod:`.training` (consumes them),
:mod:`.pipelines` (wires them), :mod:`gradnet_cupy.store` and
:mod:`gradnet_cupy.extract` (what they read).
"""
from typing import NamedTuple

import numpy as np

from gradnet_cupy.backend import to_device
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import candidate_plan, iter_sparse_tangents
from gradnet_cupy.gradnet.training import evaluate_candidates
from gradnet_cupy.normalize import TrainingFeatures
from gradnet_cupy.store import file_sha256
from gradnet_cupy.tangent import ParameterLayout

STATS_READ_BATCH = 256    # store rows per read when a normalizer makes a pass
PREFETCH_BATCHES = 2      # store batches decoded ahead by a reader thread
# samples per evaluation batch read from a test store (x 10 candidate rows):
# what the evaluation holds at once, with its normalized copy
TEST_BATCH_SAMPLES = 10
# provenance keys that a training and a test store must share: the same base
# network snapshot seen through the same layout, dataset, q and classes (and,
# for an RBM's scores, the same extract --fisher-scaling)
SNAPSHOT_KEYS = ('model_sha256', 'arch', 'dataset', 'q', 'n_classes',
                 'fisher_scaling')


def snapshot_identity(store):
    """What a GradNet trained on the open store ``store`` expects of every
    store it is evaluated on: the :data:`SNAPSHOT_KEYS` of its provenance
    and its column layout (a JSON-able dict)."""
    if len(store) == 0:
        raise GradnetError(f'{store.path}: the store has no rows')
    return dict({k: store.provenance.get(k) for k in SNAPSHOT_KEYS},
                layout=store.layout)


def online_identity(snapshot, arch, dataset, n_classes, layout):
    """The :func:`snapshot_identity` keys of tangents extracted on the fly
    from the snapshot file ``snapshot`` (all but ``q``, which the
    extraction is given): a JSON-able dict."""
    return {'model_sha256': file_sha256(snapshot), 'arch': arch,
            'dataset': dataset, 'n_classes': int(n_classes),
            'layout': layout.to_dict()}


def check_same_snapshot(found, identity, what):
    """GradnetError unless every key of ``found`` (a
    :func:`snapshot_identity` or :func:`online_identity`) equals
    ``identity``'s (the training features'); ``what`` names the test
    data in the message."""
    differ = [f'{k} {found.get(k)!r} (training {identity.get(k)!r})'
              for k in found if k != 'layout'
              and found.get(k) != identity.get(k)]
    if found['layout'] != identity.get('layout'):
        differ.append('the column layout')
    if differ:
        raise GradnetError(
            f'{what} does not come from the training features\' '
            f"snapshot and layout: it differs in {', '.join(differ)}")


def check_test_store(test_store, identity):
    """GradnetError unless the open ``test_store`` has rows, holds every
    candidate of each sample (the all-candidates accuracy is not defined
    otherwise: with one random candidate per sample it would measure how
    often that candidate is the label) or, for an objective without
    candidates (``candidates`` recorded as ``'none'``: one row per sample),
    that one row, and matches ``identity`` (:func:`snapshot_identity` of the
    training store)."""
    found = snapshot_identity(test_store)
    mode = test_store.provenance.get('candidates')
    if mode not in ('all', 'none'):
        raise GradnetError(
            f'{test_store.path} was extracted with --candidates {mode}; the '
            'test accuracy ranks all candidates of a sample: extract the '
            'test split with --candidates all')
    check_same_snapshot(found, identity, test_store.path)


class OnlineTest(NamedTuple):
    """The test split scored without a test store: its tangents (all
    candidates) extracted batch by batch and never written. ``base``: the
    base network on the device; ``layout``: its ParameterLayout; ``data``:
    the :class:`~gradnet_cupy.data.Dataset`; ``identity``: the
    :func:`online_identity` of its snapshot."""
    base: object
    layout: ParameterLayout
    data: object
    identity: dict

    def check(self, identity):
        """GradnetError unless this is the snapshot, layout and dataset of
        the training features' ``identity``."""
        check_same_snapshot(self.identity, identity,
                            'the test split extracted on the fly')


def online_test_batches(base, layout, data, q, device, batch=64):
    """``(csr, sample, target)`` batches of the test split extracted on the
    fly (all candidates, eval transform, never written): float32 CSR on
    ``device`` (rows x n_columns), int64 sample ids and int true labels
    (rows,); with ``batch`` equal to the extraction's ``--batch``, the rows
    of a test store bit for bit."""
    x, y = data.test
    for csr, sample, _, target in iter_sparse_tangents(
            base, x, y, None, q, layout, device, data.eval_transform, batch):
        yield csr, sample, target


def store_test_batches(test_store, device, batch=TEST_BATCH_SAMPLES):
    """``(csr, sample, target)`` batches of a test store: a float32 CSR
    (rows x n_columns) on ``device`` and the host int64 sample id and int
    true label of each row (rows,), all candidate rows of each sample read
    together (for :func:`~.training.evaluate_candidates`)."""
    for b in test_store.iter_batches(batch, group_by_sample=True,
                                     prefetch=PREFETCH_BATCHES):
        yield b.csr.to_device(device), b.sample, b.target


def store_evaluator(model, test_store, normalizer, device):
    """``() -> accuracy`` of ``model`` on a test store."""
    def evaluate_test():
        return evaluate_candidates(
            model, store_test_batches(test_store, device), normalizer)[0]
    return evaluate_test


def store_batches(store, normalizer, batch, seed, device):
    """``epoch -> iterator of (normalized csr, target)`` over a training
    store, shuffled per epoch from ``seed``: float32 CSR (``batch`` rows x
    n_columns) and int32 (rows,) labels, both on ``device``."""
    def epoch_batches(epoch):
        for b in store.iter_batches(batch, shuffle=True, seed=seed + epoch,
                                    prefetch=PREFETCH_BATCHES):
            yield (normalizer(b.csr.to_device(device)),
                   to_device(b.target.astype(np.int32), device))
    return epoch_batches


def store_classes(store):
    """The number of classes recorded in a store's provenance."""
    try:
        return int(store.provenance['n_classes'])
    except KeyError:
        raise GradnetError(f'{store.path}: the store does not record '
                           'n_classes (extract it again)') from None


def online_batches(base, layout, data, q, normalizer, batch, seed, device):
    """Algorithm 1 of the paper without a store: ``epoch -> iterator of
    (normalized csr, target)``, each batch of the gradnet split freshly
    augmented (the dataset's train transform), given new random candidates,
    extracted and sparsified."""
    x, y = data.gradnet

    def epoch_batches(epoch):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(x))
        candidates = rng.integers(0, data.n_classes, size=len(x))
        for csr, _, _, target in iter_sparse_tangents(
                base, x[order], y[order], candidates.astype(np.int32), q,
                layout, device, lambda v: data.train_transform(v, rng),
                batch):
            yield normalizer(csr), target
    return epoch_batches


def store_training_features(store, device):
    """The :class:`~gradnet_cupy.normalize.TrainingFeatures` of an open
    training store: its rows read in batches onto ``device``, with the
    column statistics and ``q`` it records."""
    return TrainingFeatures(
        ParameterLayout.from_dict(store.layout), store.provenance.get('q'),
        lambda: (b.csr.to_device(device)
                 for b in store.iter_batches(STATS_READ_BATCH,
                                             prefetch=PREFETCH_BATCHES)),
        device, store.column_stats(), store)


def online_training_features(base, layout, data, q, seed, device, batch=64):
    """The :class:`~gradnet_cupy.normalize.TrainingFeatures` the online
    trainer's normalizer is fitted on: the gradnet split's sparse tangents
    (random candidates from ``seed``, eval transform) on ``device``."""
    x, y = data.gradnet
    candidates = candidate_plan('random', y, data.n_classes, seed)

    def batches():
        for csr, *_ in iter_sparse_tangents(base, x, y, candidates, q, layout,
                                            device, data.eval_transform,
                                            batch):
            yield csr
    return TrainingFeatures(layout, q, batches, device)


def online_evaluator(model, base, layout, data, q, normalizer, device,
                     batch=64):
    """``() -> accuracy`` on the test split, its tangents (all candidates)
    extracted on the fly (:func:`online_test_batches`)."""
    def evaluate_test():
        return evaluate_candidates(
            model, online_test_batches(base, layout, data, q, device, batch),
            normalizer)[0]
    return evaluate_test
