"""GradNet: a shallow block-structured network trained on sparse tangent
features, and the pipelines that fit it.

Modules: :mod:`.model` (the network, sparse matmul, hidden sizes, column
ranges, the all-candidates prediction rule), :mod:`.training` (optimizers,
one step, the loop, :func:`evaluate_candidates`), :mod:`.sources` (batches
from a store or extracted online), :mod:`.persist` (save/load a fit's
folder, the resumable :class:`FitFolder`), :mod:`.plots` (the learning curve), :mod:`.pipelines`
(:func:`fit_stores`, :func:`fit_online`, :func:`save_fit`).
"""
from gradnet_cupy.gradnet.model import (
    WIRINGS, GradNet, build_gradnet, candidate_outputs, check_dropout,
    check_wiring, column_ranges, predict_from_candidates,
    proportional_hidden_sizes, sparse_matmul, to_sparse_matrix)
from gradnet_cupy.gradnet.persist import FitFolder, load_gradnet, save_gradnet
from gradnet_cupy.gradnet.pipelines import fit_online, fit_stores, save_fit
from gradnet_cupy.gradnet.plots import save_learning_curve
from gradnet_cupy.gradnet.sources import (
    OnlineTest, check_test_store, snapshot_identity, online_batches,
    online_evaluator, online_identity, online_test_batches,
    online_training_features, store_batches, store_classes, store_evaluator,
    store_test_batches, store_training_features)
from gradnet_cupy.gradnet.training import (
    GRADNET_OPTIMIZERS, check_optimizer, evaluate_candidates, make_optimizer,
    train, train_step)

__all__ = [
    'FitFolder', 'GRADNET_OPTIMIZERS', 'OnlineTest', 'WIRINGS', 'GradNet',
    'build_gradnet',
    'candidate_outputs', 'check_test_store', 'snapshot_identity', 'check_dropout', 'check_optimizer', 'check_wiring',
    'column_ranges', 'evaluate_candidates', 'fit_online', 'fit_stores',
    'load_gradnet', 'make_optimizer', 'online_batches', 'online_evaluator',
    'online_identity', 'online_test_batches',
    'online_training_features', 'predict_from_candidates',
    'proportional_hidden_sizes', 'save_fit', 'save_gradnet',
    'save_learning_curve', 'sparse_matmul', 'store_batches', 'store_classes',
    'store_evaluator', 'store_test_batches', 'store_training_features',
    'to_sparse_matrix', 'train', 'train_step']
