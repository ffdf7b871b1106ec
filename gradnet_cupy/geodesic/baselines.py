"""The methods a geodesic walk is compared with (issue #15).

Neighbours: :mod:`.walk` (the geodesic and fip walks), :mod:`.targets`
(the projections used here as pruning), :mod:`.weights`.

:func:`one_shot`
    project once onto the target (magnitude pruning: the smallest p% of
    ``|w|`` set to zero; structured: the weakest units removed), no data.
:func:`prune_finetune`
    iterative pruning: ``rounds`` times, prune to ``r/rounds`` of the
    target's removal (:meth:`Target.scaled`), then fine-tune with the
    pruned entries held at zero, ``passes / rounds`` passes over the
    training data each (SGD with momentum on the softmax cross-entropy;
    the budget of passes is the comparison's currency).
:func:`finetune`
    sequential fine-tuning of every parameter on a (new) task: the
    catastrophic-forgetting baseline of the task switch.
:func:`interpolate`
    the straight line ``(1 - t) w1 + t w2`` between two networks.

Every function moves ``model`` in place and returns a history: a list of
dicts with ``passes`` (passes over its training data) and the evaluator's
numbers; the last entry describes the final network.
"""
import sys

import numpy as np
from tqdm import tqdm

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer, F
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.geodesic.walk import model_device
from gradnet_cupy.geodesic.weights import (get_weights, host_float64,
                                           set_weights, sparsity)
from gradnet_cupy.backend import to_device


def _metrics(evaluate, model):
    if evaluate is None:
        return {}
    with chainer.using_config('train', False):
        return {k: float(v) for k, v in evaluate(model).items()}


def one_shot(model, layout, target, evaluate=None):
    """``w = P(w)``; returns ``[entry]`` with ``sparsity`` of ``w``."""
    w = target.project(get_weights(model, layout))
    set_weights(model, layout, w)
    return [{'passes': 0.0, 'sparsity': sparsity(w),
             **_metrics(evaluate, model)}]


def finetune(model, x, y, passes, *, layout=None, mask=None, batch=32,
             lr=0.01, momentum=0.9, seed=0, evaluate=None, eval_points=10,
             start_passes=0.0, progress=False):
    """Train every parameter of ``model`` on ``(x, y)`` (float32 NumPy
    model-ready inputs, int32 labels) for ``passes`` passes (may be
    fractional) of MomentumSGD on the softmax cross-entropy, batches of
    ``batch`` in a random order from ``default_rng(seed)``.

    ``mask`` (bool (layout.n_params,), with ``layout``): entries of the
    layout's weight vector held at zero (re-zeroed after every update).
    ``evaluate`` runs ``eval_points`` times, evenly over the passes.
    Returns the history (``passes`` counted from ``start_passes``).
    """
    if not passes > 0:
        raise GradnetError(f'passes must be > 0, got {passes}')
    if (mask is None) != (layout is None):
        raise GradnetError('finetune needs both layout and mask, or neither')
    device = model_device(model)
    total = int(round(passes * len(x)))
    optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum)
    optimizer.setup(model)
    rng = np.random.default_rng(seed)
    checkpoints = set(np.linspace(0, total, eval_points + 1)[1:].astype(int))
    history, seen, order = [], 0, np.zeros(0, dtype=np.int64)
    with tqdm(total=total, desc='fine-tune', unit='img', leave=False,
              file=sys.stderr, disable=None if progress else True) as bar:
        while seen < total:
            if len(order) == 0:
                order = rng.permutation(len(x))
            size = min(batch, total - seen, len(order))
            index, order = order[:size], order[size:]
            with chainer.using_config('train', True):
                loss = F.softmax_cross_entropy(
                    model(to_device(x[index], device)),
                    to_device(y[index], device))
            model.cleargrads()
            loss.backward()
            optimizer.update()
            if mask is not None:
                w = get_weights(model, layout)
                w[mask] = 0
                set_weights(model, layout, w)
            before, seen = seen, seen + size
            bar.update(size)
            if any(before < c <= seen for c in checkpoints):
                history.append({'passes': start_passes + seen / len(x),
                                'loss': float(loss.array),
                                **_metrics(evaluate, model)})
    return history


def prune_finetune(model, layout, target, x, y, passes, *, rounds=5,
                   evaluate=None, progress=False, first_round=1, history=None,
                   after_round=None, **train):
    """Iterative pruning with fine-tuning (module docstring): ``rounds``
    prune + fine-tune cycles sharing ``passes`` passes over ``(x, y)``;
    ``train``: :func:`finetune`'s ``batch``, ``lr``, ``momentum``, ``seed``
    (round ``r`` shuffles with ``seed + r``).

    Each round records one entry after pruning and one after fine-tuning
    (``round``, ``sparsity``, ``passes``, metrics). Resuming: start at
    ``first_round`` with the ``history`` of the rounds before (the model
    holding the weights after them); ``after_round(r, history)`` is called
    after every round (e.g. to write a checkpoint). Returns the history.
    """
    if not (isinstance(rounds, int) and rounds >= 1):
        raise GradnetError(f'rounds must be an integer >= 1, got {rounds}')
    history = list(history or [])
    for r in range(first_round, rounds + 1):
        spent = passes * (r - 1) / rounds
        stage = target.scaled(r / rounds)
        w = stage.project(get_weights(model, layout))
        set_weights(model, layout, w)
        mask = stage.zero_mask(w) | (w == 0)
        history.append({'round': r, 'pruned': True, 'passes': spent,
                        'sparsity': sparsity(w), **_metrics(evaluate, model)})
        part = finetune(model, x, y, passes / rounds, layout=layout,
                        mask=mask, evaluate=evaluate, eval_points=1,
                        start_passes=spent, progress=progress,
                        **{**train, 'seed': train.get('seed', 0) + r})
        w = get_weights(model, layout)
        history.append({**part[-1], 'round': r, 'sparsity': sparsity(w)})
        if after_round is not None:
            after_round(r, history)
    return history


def interpolate(model, layout, w1, w2, points=11, evaluate=None):
    """Evaluate ``(1 - t) w1 + t w2`` at ``points`` evenly spaced ``t`` in
    [0, 1]; the model ends at ``w2``. Entries: ``t``, ``distance`` (to
    ``w2``), ``passes`` (0: no data is used), metrics."""
    if points < 2:
        raise GradnetError(f'interpolate needs at least 2 points, got '
                           f'{points}')
    xp = get_array_module(w1)
    gap = float(np.linalg.norm(host_float64(w2) - host_float64(w1)))
    history = []
    for t in np.linspace(0.0, 1.0, points):
        w = ((1 - t) * w1 + t * w2).astype(w1.dtype)
        set_weights(model, layout, xp.asarray(w))
        history.append({'t': float(t), 'distance': (1 - t) * gap,
                        'passes': 0.0, **_metrics(evaluate, model)})
    return history
