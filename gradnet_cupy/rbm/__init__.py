"""A Bernoulli RBM and its Fisher-score tangent features (seed 000, Table 1).

Modules: :mod:`.model` (the RBM link: free energy, p(h|v), Gibbs steps,
binarization, snapshots), :mod:`.training` (CD-k, persistent chains),
:mod:`.fisher` (per-sample ``grad log p(v)`` through the tangent engine,
the Gibbs / exact centring term, the diagonal Fisher scaling),
:mod:`.commands` (the ``train-rbm`` command, :data:`COMMANDS`).
"""
from gradnet_cupy.rbm.model import (
    RBM, binarize, check_binary, load_rbm, save_rbm, sigmoid)
from gradnet_cupy.rbm.training import (
    cd_gradients, cd_step, draw_uniforms, reconstruction_error, train_rbm)
from gradnet_cupy.rbm.fisher import (
    FREE_ENERGY, OBJECTIVES, DiagonalFisher, check_objective_for,
    exact_expectation, fisher_scores, free_energy_gradients, gibbs_samples,
    model_expectation, rbm_layout)

__all__ = [
    'RBM', 'binarize', 'check_binary', 'load_rbm', 'save_rbm', 'sigmoid',
    'cd_gradients', 'cd_step', 'draw_uniforms', 'reconstruction_error',
    'train_rbm', 'FREE_ENERGY', 'OBJECTIVES', 'DiagonalFisher',
    'check_objective_for', 'exact_expectation', 'fisher_scores',
    'free_energy_gradients', 'gibbs_samples', 'model_expectation',
    'rbm_layout']
