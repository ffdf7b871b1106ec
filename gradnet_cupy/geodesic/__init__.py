"""Geodesic paths in weight space (issue #15; seed paper 003 and the
functionally invariant paths of Raghavan & Thomson).

A trained network is moved, step by step, toward a target set of weights
(a sparse network, fewer units, another network's weights) along a path
that keeps its outputs on a task: each step solves
``argmin theta^T g theta - beta theta^T v  s.t.  theta^T theta <= eps`` with
``g = J^T J`` the output metric of a batch (:mod:`.step`), toward the unit
direction ``v`` of the target (:mod:`.targets`), repeated by :mod:`.walk`;
:mod:`.baselines` are the methods it is compared with and :mod:`.cli` the
``sparsify-path`` / ``task-path`` commands.
"""
from gradnet_cupy.geodesic.baselines import (finetune, interpolate, one_shot,
                                             prune_finetune)
from gradnet_cupy.geodesic.step import (BlockSolver, Step,
                                        anchored_direction, exact_step,
                                        make_solver, solve_mu)
from gradnet_cupy.geodesic.targets import (MagnitudeTarget, StructuredTarget,
                                           Target, WeightsTarget,
                                           check_sparsity)
from gradnet_cupy.geodesic.walk import WalkResult, WalkSettings, walk
from gradnet_cupy.geodesic.weights import (get_weights, layout_of,
                                           same_architecture, set_weights,
                                           sparsity)

__all__ = ['BlockSolver', 'MagnitudeTarget', 'Step', 'StructuredTarget',
           'Target', 'WalkResult', 'WalkSettings', 'WeightsTarget',
           'anchored_direction', 'check_sparsity', 'exact_step', 'finetune',
           'get_weights', 'interpolate', 'layout_of', 'make_solver',
           'one_shot', 'prune_finetune', 'same_architecture', 'set_weights',
           'solve_mu', 'sparsity', 'walk']
