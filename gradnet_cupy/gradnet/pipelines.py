"""The two ways ``gradnet-cupy fit`` trains a GradNet, and saving the fit.

:func:`fit_stores` trains on a training store and evaluates on a test store;
:func:`fit_online` is Algorithm 1 (tangents extracted per batch, no store).
Both fit the normalizer on training features only
(:func:`gradnet_cupy.normalize.fit_normalizer`), build the model
(:mod:`.model`), feed it from :mod:`.sources` and train it with
:mod:`.training`; options are the typed ones of :mod:`gradnet_cupy.options`.
:func:`save_fit` installs the result with :mod:`.persist` (a
:class:`~.persist.FitFolder`, which also holds the per-epoch checkpoints a
rerun resumes from) and :mod:`.plots`.
"""
import contextlib
import os

import numpy as np

from gradnet_cupy.errors import GradnetError, naming
from gradnet_cupy.gradnet.model import build_gradnet
from gradnet_cupy.gradnet.plots import save_learning_curve
from gradnet_cupy.gradnet.sources import (
    check_test_store, online_batches, online_evaluator,
    online_training_features, snapshot_identity, store_batches,
    store_classes, store_evaluator, store_training_features)
from gradnet_cupy.gradnet.training import make_optimizer, train
from gradnet_cupy.models import model_to_device
from gradnet_cupy.normalize import fit_normalizer
from gradnet_cupy.scaleout.parallel import SINGLE
from gradnet_cupy.scaleout.training import (rank_batches, rank_evaluator,
                                            share_state)
from gradnet_cupy.store import TangentStore


def fit_stores(train_path, test_path, normalize, net, training, device,
               progress, folder=None, online_test=None, parallel=SINGLE):
    """GradNet trained on a training store, evaluated on a test store:
    ``(model, normalizer, history)``.

    ``normalize``, ``net``, ``training``: a
    :class:`~gradnet_cupy.options.NormalizeOptions`, ``NetOptions`` and
    ``TrainOptions``. The normalizer is fitted on the training store (its
    column statistics, its ``q``, and whatever its method keeps beside it,
    e.g. the sums of ``extract --normalize metric``), or on the store
    ``normalize.fit_store`` when given (:func:`normalizer_store`). The test
    store must come from the same snapshot and layout and hold all
    candidates (:func:`~.sources.check_test_store`). ``online_test``: an
    :class:`~.sources.OnlineTest` of the same snapshot, to extract the test
    split on the fly instead (``test_path`` is then not read; single
    process only). ``folder``: a :class:`~.persist.FitFolder` to
    checkpoint every epoch into and resume from (None: no checkpoints).
    ``parallel``: the ranks of a data-parallel fit
    (:mod:`gradnet_cupy.scaleout.training`; ``folder`` only on rank 0).
    """
    with contextlib.ExitStack() as stack:
        train_store = stack.enter_context(TangentStore.open(train_path))
        identity = snapshot_identity(train_store)
        if online_test is None:
            test_store = stack.enter_context(TangentStore.open(test_path))
            check_test_store(test_store, identity)
        else:
            online_test.check(identity)
        fit_store = stack.enter_context(
            normalizer_store(normalize.fit_store, train_store))
        normalizer = fit_normalizer(
            store_training_features(fit_store, device), normalize)
        features = store_training_features(train_store, device)
        model = build_gradnet(features.layout.block_sizes,
                              store_classes(train_store), net)
        if parallel.size == 1:
            batches = store_batches(train_store, normalizer, training.batch,
                                    training.seed, device)
            evaluator = store_evaluator(
                model, test_store, normalizer, device) \
                if online_test is None else online_evaluator(
                    model, online_test.base, online_test.layout,
                    online_test.data, identity['q'], normalizer, device)
        else:
            batches = rank_batches(train_store, normalizer, training.batch,
                                   training.seed, device, parallel)
            evaluator = rank_evaluator(model, test_store, normalizer, device,
                                       parallel)
        history = _train(model, device, training, batches, evaluator,
                         progress, folder, parallel)
    return model, normalizer, history


@contextlib.contextmanager
def normalizer_store(path, train_store):
    """The open store a normalizer is fitted on: ``train_store`` when
    ``path`` is None, else the store at ``path`` (opened here, closed on
    exit), which must hold rows of the training store's snapshot, layout
    and q (any split, any candidates); a one-line GradnetError otherwise."""
    if path is None:
        yield train_store
        return
    identity = snapshot_identity(train_store)
    with TangentStore.open(path) as store:
        found = snapshot_identity(store)
        differ = [key for key in identity if found[key] != identity[key]]
        if differ:
            raise GradnetError(
                f'{path}: the normalizer\'s store does not come from the '
                f"training store's snapshot: it differs in "
                f"{', '.join(differ)}")
        yield store


def fit_online(base, layout, data, q, normalize, net, training, device,
               progress, folder=None):
    """GradNet trained by Algorithm 1 (no store): ``(model, normalizer,
    history)``. The normalizer is fitted on one pass over the gradnet
    split's tangents (:func:`~.sources.online_training_features`); options
    as in :func:`fit_stores` (``normalize.fit_store`` must be None)."""
    if normalize.fit_store is not None:
        raise GradnetError('a normalizer store needs store fits (--train); '
                           'the online fit normalizes on its own tangents')
    seed = training.seed
    normalizer = fit_normalizer(
        online_training_features(base, layout, data, q, seed, device),
        normalize)
    model = build_gradnet(layout.block_sizes, data.n_classes, net)
    history = _train(
        model, device, training,
        online_batches(base, layout, data, q, normalizer, training.batch,
                       seed, device),
        online_evaluator(model, base, layout, data, q, normalizer, device),
        progress, folder)
    return model, normalizer, history


def _train(model, device, training, epoch_batches, evaluate_test, progress,
           folder, parallel=SINGLE):
    """The training loop, checkpointed into ``folder`` after every epoch and
    resumed from its last checkpoint (bit for bit: the batches of an epoch
    depend only on the seed and the epoch). Data-parallel: rank 0 (the one
    with a ``folder``) resumes and shares its state with the others."""
    model_to_device(model, device)
    optimizer = parallel.optimizer(make_optimizer(
        model, training.optimizer, training.lr, training.momentum,
        training.weight_decay))
    # Chainer draws dropout masks on the CPU from NumPy's global generator:
    # seeded, so that a fit is repeatable (a checkpoint restores its state)
    np.random.seed(training.seed)
    start = after_epoch = None
    if folder is not None:
        folder.start()
        start = folder.load_checkpoint(model, optimizer)
        after_epoch = lambda state: folder.save_checkpoint(  # noqa: E731
            model, optimizer, state)
    if parallel.size > 1:
        start = parallel.bcast(start)
        if start is not None:    # a fresh start: the same weights already
            share_state(parallel, model, optimizer)
        # each rank its own dropout masks (not restored by a resume)
        np.random.seed([training.seed, parallel.rank,
                        start['epoch'] if start else 0])
    return train(model, optimizer, training.epochs, epoch_batches,
                 evaluate_test, training.eval_every, progress, start=start,
                 after_epoch=after_epoch, parallel=parallel)


def save_fit(folder, model, normalizer, history):
    """Install a fitted GradNet, its history and learning curve as the
    :class:`~.persist.FitFolder` ``folder``'s final folder (atomically);
    returns the summary dict."""
    summary = {'test_accuracy': history[-1]['test_accuracy'],
               'hidden_sizes': model.hidden_sizes, 'out': folder.out}
    model.to_cpu()
    folder.start()
    curve = os.path.join(folder.work, 'learning_curve.png')
    with naming(curve):
        save_learning_curve(history, curve)
    folder.install(model, normalizer, {'history': history,
                                       'summary': summary})
    return summary
