"""The walk: repeated steps on fresh batches until the target set is reached.

Neighbours: :mod:`.step` (the geodesic QP), :mod:`.targets` (direction and
distance), :mod:`.weights` (the vector ``w``); :mod:`.baselines` are the
methods the walk is compared with, :mod:`.cli` the commands around it.

One step at weights ``w`` (step ``k``, batch ``x_k`` of ``batch`` inputs of
the task whose function is kept, drawn without replacement by
``numpy.random.default_rng([seed, k])``, so a resumed walk sees the same
batches):

``geodesic`` (003, eq. 7)
    ``J`` = the logit Jacobian of ``x_k`` (B*C rows, float64), scaled by
    ``1/sqrt(B)`` so that ``g = J^T J`` is the *mean* per-sample output
    metric (a choice: it makes ``beta`` independent of the batch size);
    ``theta`` = the solver's step (:func:`.step.exact_step` or the block
    solver) toward ``v = direction(w)`` with radius
    ``eps_k = min(eps, distance^2)`` (a choice: the last steps do not
    overshoot the set). With ``anchor > 0`` (a choice beyond 003) the step
    is the anchored one of :mod:`.step`: the outputs are kept near those of
    the network the walk started from (drift ``r = (z - z0) / sqrt(B)`` of
    the batch's logits), not only near the current ones; ``anchor = 0`` is
    003's step; it needs the exact solver (measured: with the block
    metric the walk stalls).
``fip`` (functionally invariant path, Raghavan & Thomson)
    ``D(w)`` = the mean over ``x_k`` of ``KL(softmax(z0) || softmax(z))``
    (``divergence='kl'``) or of ``||z - z0||^2`` (``'l2'``) between the
    logits ``z`` of the current network and ``z0`` of the network the walk
    started from; the step is the normalized descent direction of
    ``D(w) + pull * distance(w)``: ``u = grad D - pull * v``,
    ``theta = -sqrt(eps_k) u / ||u||``.

Stopping rule: the walk stops when ``distance(w) <= threshold`` (003:
0.01) or after ``max_steps`` steps; with ``project_at_end`` the final
``w`` is then projected onto the set (``P(w)``: exactly sparse, or ``w2``).

History: one dict per step (``step``, ``distance`` after the step,
``samples`` and ``passes`` = samples / len(inputs), ``mu``, ``quad`` =
``theta^T g theta`` on the batch (geodesic), ``drift`` = ``r^T r``, the
batch's mean squared logit drift before the step (anchored geodesic),
``step_norm``, ``seconds``),
plus the evaluator's numbers every ``eval_every`` steps, at step 0 and at
the end. The best evaluated point by ``score(metrics)`` is kept.

Checkpoint (``checkpoint=PATH``): every ``checkpoint_every`` steps an npz
with ``w``, the best point and a JSON state (step, history, identity of the
run) is written atomically (temporary file + rename). A walk started with
the same network, target and settings resumes from it; one of another run
is refused.
"""
import copy
import dataclasses
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.chainer_compat import chainer, F
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.geodesic.step import (BLOCK_PARTITIONS, DEFAULT_BETA,
                                        DEFAULT_EPS, SOLVERS,
                                        anchored_direction, make_solver)
from gradnet_cupy.geodesic.weights import (get_gradients, get_weights,
                                           host_float64, set_weights)
from gradnet_cupy.tangent import logit_jacobian
from gradnet_cupy.files import atomic_write

METHODS = ('geodesic', 'fip')
DIVERGENCES = ('kl', 'l2')
DEFAULT_THRESHOLD = 0.01    # 003: distance to the sparse set at which to stop
CHECKPOINT_FORMAT = 'gradnet-cupy geodesic walk'
# settings that may change between a run and its resumption
_RESUMABLE = ('max_steps', 'eval_every', 'checkpoint_every',
              'project_at_end')


@dataclasses.dataclass(frozen=True)
class WalkSettings:
    """Settings of :func:`walk` (module docstring)."""
    method: str = 'geodesic'
    solver: str = 'exact'
    partition: str = 'per_unit'
    max_block: int = 256
    beta: float = DEFAULT_BETA
    eps: float = DEFAULT_EPS
    threshold: float = DEFAULT_THRESHOLD
    max_steps: int = 500
    batch: int = 16
    divergence: str = 'kl'
    pull: float = 1.0
    anchor: float = 0.0
    eval_every: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    project_at_end: bool = True

    def check(self):
        """Raise :class:`GradnetError` for an invalid setting; return self."""
        checks = [
            (self.method in METHODS, f"unknown method {self.method!r}: "
                                     f"choose one of {', '.join(METHODS)}"),
            (self.solver in SOLVERS, f"unknown solver {self.solver!r}: "
                                     f"choose one of {', '.join(SOLVERS)}"),
            (self.partition in BLOCK_PARTITIONS,
             f'unknown partition {self.partition!r}'),
            (self.divergence in DIVERGENCES,
             f'unknown divergence {self.divergence!r}'),
            (self.beta > 0, f'beta must be > 0, got {self.beta}'),
            (self.eps > 0, f'eps must be > 0, got {self.eps}'),
            (self.threshold >= 0, f'threshold must be >= 0, got '
                                  f'{self.threshold}'),
            (self.max_steps >= 1, f'max steps must be >= 1, got '
                                  f'{self.max_steps}'),
            (self.batch >= 1, f'batch must be >= 1, got {self.batch}'),
            (self.pull > 0, f'pull must be > 0, got {self.pull}'),
            (self.anchor >= 0, f'anchor must be >= 0, got {self.anchor}'),
            (self.anchor == 0 or self.method == 'geodesic',
             'anchor applies to the geodesic method only (fip is anchored '
             'by its divergence)'),
            (self.anchor == 0 or self.solver == 'exact',
             'anchor needs the exact solver: with the block-diagonal metric '
             'the drift correction does not shrink the drift and the walk '
             'stalls (docs/geodesic.rst)'),
            (self.eval_every >= 0, 'eval_every must be >= 0'),
            (self.checkpoint_every >= 1, 'checkpoint_every must be >= 1'),
        ]
        for ok, message in checks:
            if not ok:
                raise GradnetError(message)
        return self

    def identity(self):
        """The settings that define a run (a checkpoint must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in _RESUMABLE}


class WalkResult(NamedTuple):
    """``w``: final weights (the model holds them too); ``history``: list of
    dicts; ``reached``: the distance fell to the threshold; ``steps``;
    ``passes``: passes over ``inputs``; ``best``: the best evaluated
    history entry (or None) and ``best_w`` its weights (NumPy float64, or
    None); ``timing``: seconds spent in ``jacobian`` / ``solve`` /
    ``update`` (for the benchmark)."""
    w: object
    history: list
    reached: bool
    steps: int
    passes: float
    best: object
    best_w: object
    timing: dict


def model_device(model):
    """'gpu' when the model's parameters are CuPy arrays, else 'cpu'."""
    first = next(iter(model.params())).array
    return 'cpu' if get_array_module(first) is np else 'gpu'


def batch_inputs(inputs, batch, seed, step, xp):
    """The inputs of step ``step``: ``batch`` rows of ``inputs`` (NumPy
    (N, ...)) drawn without replacement by ``default_rng([seed, step])``,
    as an array of module ``xp``."""
    rng = np.random.default_rng([seed, step])
    index = rng.choice(len(inputs), size=min(batch, len(inputs)),
                       replace=False)
    return xp.asarray(inputs[np.sort(index)])


def metric_rows(J):
    """The rows of the walk's metric: a logit Jacobian (B, C, n) as float64
    (B*C, n) scaled by ``1/sqrt(B)``, so that ``J^T J`` is the mean
    per-sample output metric (module docstring)."""
    return J.reshape(-1, J.shape[-1]).astype(np.float64) / np.sqrt(len(J))


def divergence(z, z0, kind):
    """Mean over the batch of KL(softmax(z0) || softmax(z)) (``'kl'``) or
    of ||z - z0||^2 (``'l2'``); ``z`` a Chainer variable (B, C), ``z0`` an
    array. Returns a Chainer scalar variable."""
    if kind == 'l2':
        return F.sum((z - z0) ** 2) / z.shape[0]
    p0 = F.softmax(z0)
    return F.sum(p0 * (F.log_softmax(z0) - F.log_softmax(z))) / z.shape[0]


class _Walker:
    """State and one step of :func:`walk`."""

    def __init__(self, model, layout, target, inputs, settings):
        self.model, self.layout, self.target = model, layout, target
        self.inputs, self.settings = inputs, settings
        self.xp = get_array_module(next(iter(model.params())).array)
        self.device = model_device(model)
        self.solver = (make_solver(settings.solver, layout, settings.partition,
                                   settings.max_block, device=self.device)
                       if settings.method == 'geodesic' else None)
        self.reference = (copy.deepcopy(model)
                          if settings.method == 'fip' or settings.anchor
                          else None)
        self.timing = {'jacobian': 0.0, 'solve': 0.0, 'update': 0.0}

    def _clock(self, key, start):
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()
        now = time.perf_counter()
        self.timing[key] += now - start
        return now

    def step(self, w, v, distance, k):
        """Move ``w`` one step toward the target; returns (w, record)."""
        s = self.settings
        eps_k = min(s.eps, distance * distance)
        x = batch_inputs(self.inputs, s.batch, s.seed, k, self.xp)
        start = time.perf_counter()
        record = {}
        if s.method == 'geodesic':
            with chainer.using_config('train', False):
                J = logit_jacobian(self.model, x, layout=self.layout)
            J = metric_rows(J)
            if s.anchor:
                drift = self._drift(x)
                v = anchored_direction(J, v, drift, s.beta, s.anchor)
                record['drift'] = float(drift @ drift)
            start = self._clock('jacobian', start)
            solved = self.solver(J, v, s.beta, eps_k)
            theta = solved.theta
            record.update(mu=solved.mu, quad=solved.quad)
        else:
            theta = self._fip_theta(x, v, eps_k)
            start = self._clock('jacobian', start)
        start = self._clock('solve', start)
        w = w + theta.astype(w.dtype)
        set_weights(self.model, self.layout, w)
        self._clock('update', start)
        record['step_norm'] = float(self.xp.linalg.norm(theta))
        return w, record, len(x)

    def _drift(self, x):
        """``(z - z0).ravel() / sqrt(B)``: the batch's logit drift from the
        starting network, in the row order of the scaled Jacobian."""
        with chainer.using_config('train', False), \
                chainer.no_backprop_mode():
            z = self.model(x).array
            z0 = self.reference(x).array
        return (z - z0).ravel() / np.sqrt(len(x))

    def _fip_theta(self, x, v, eps_k):
        s = self.settings
        with chainer.using_config('train', False):
            with chainer.no_backprop_mode():
                z0 = self.reference(x).array
            loss = divergence(self.model(x), z0, s.divergence)
        self.model.cleargrads()
        loss.backward()
        gradient = get_gradients(self.model, self.layout).astype(np.float64)
        if not bool(self.xp.isfinite(gradient).all()):
            raise GradnetError('the fip gradient has non-finite entries')
        u = gradient - s.pull * v
        return -np.sqrt(eps_k) * u / self.xp.linalg.norm(u)


def _evaluate(evaluate, model):
    if evaluate is None:
        return {}
    with chainer.using_config('train', False):
        return {k: float(v) for k, v in evaluate(model).items()}


def _identity(settings, target, w0):
    return {'format': CHECKPOINT_FORMAT, 'settings': settings.identity(),
            'target': target.describe(), 'n_params': int(w0.size),
            'start_norm': round(float(np.linalg.norm(host_float64(w0))), 6)}


def save_checkpoint(path, w, state, best_w):
    """Write the walk state atomically: npz with ``w`` (its dtype),
    ``best_w`` (float64, empty when none) and ``state`` (JSON text)."""
    arrays = {'w': to_numpy(w), 'state': np.array(json.dumps(state)),
              'best_w': (np.zeros(0) if best_w is None else best_w)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, identity):
    """``(w NumPy, state dict, best_w or None)`` of a checkpoint, or None when
    ``path`` does not exist; :class:`GradnetError` when it is unreadable or
    belongs to another run."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as npz:
            w, state = npz['w'], json.loads(str(npz['state']))
            best_w = npz['best_w']
    except (OSError, ValueError, KeyError) as e:
        raise GradnetError(f'{path}: not a readable walk checkpoint ({e})') \
            from e
    if state.get('identity') != identity:
        raise GradnetError(f'{path} is the checkpoint of another walk (other '
                           'network, target or settings); remove it or '
                           'choose another output folder')
    return w, state, (best_w if best_w.size else None)


def check_start(target, w, threshold):
    """``target.direction(w)``; :class:`GradnetError` when ``w`` is already
    within ``threshold`` of the target (nothing to walk)."""
    d, distance = target.gap(w)
    if distance <= threshold:
        raise GradnetError(
            f'the network is already within {threshold} of the target '
            f'({target.describe()}): distance {distance:.3g}')
    return d / distance, distance


def walk(model, layout, target, inputs, settings=WalkSettings(), *,
         evaluate=None, score=None, checkpoint=None, progress=False):
    """Walk ``model`` (moved in place) toward ``target``.

    ``layout``: the parameters moved (:mod:`.weights`); ``target``: a
    :class:`~.targets.Target`; ``inputs``: float32 NumPy (N, *in_shape),
    model-ready inputs of the task whose function the walk keeps (003: the
    metric is computed on them only); ``settings``: :class:`WalkSettings`;
    ``evaluate``: optional ``model -> {name: float}`` (e.g. test
    accuracies); ``score``: optional ``metrics -> float`` choosing the best
    evaluated point (default: none kept); ``checkpoint``: optional path
    (module docstring); ``progress``: a tqdm bar on stderr.

    Raises :class:`GradnetError` for bad settings, a network already within
    ``threshold`` of the target, or a non-finite Jacobian. Returns a
    :class:`WalkResult`.
    """
    settings.check()
    w = get_weights(model, layout)
    identity = _identity(settings, target, w)
    walker = _Walker(model, layout, target, inputs, settings)
    xp = walker.xp
    resumed = load_checkpoint(checkpoint, identity) if checkpoint else None
    best, best_w = None, None
    if resumed is None:
        v, distance = check_start(target, w, settings.threshold)
        first = {'step': 0, 'distance': distance, 'samples': 0, 'passes': 0.0,
                 'seconds': 0.0, **_evaluate(evaluate, model)}
        history, step, samples, seconds = [first], 0, 0, 0.0
        if score is not None and evaluate is not None:
            best, best_w = first, host_float64(w)
    else:
        w_saved, state, best_w = resumed
        w = xp.asarray(w_saved)
        set_weights(model, layout, w)
        history, best = state['history'], state['best']
        step, samples, seconds = (state['step'], state['samples'],
                                  state['seconds'])
        v, distance = target.direction(w)
    n_inputs = len(inputs)
    bar = tqdm(total=settings.max_steps, initial=step, desc=settings.method,
               unit='step', file=sys.stderr, leave=False,
               disable=None if progress else True)
    started = time.perf_counter() - seconds
    try:
        while step < settings.max_steps and distance > settings.threshold:
            step += 1
            w, record, used = walker.step(w, v, distance, step)
            samples += used
            v, distance = _direction_or_zero(target, w)
            entry = {'step': step, 'distance': distance, 'samples': samples,
                     'passes': samples / n_inputs, **record,
                     'seconds': time.perf_counter() - started}
            last = (step == settings.max_steps
                    or distance <= settings.threshold)
            if settings.eval_every and (step % settings.eval_every == 0
                                        or last):
                entry.update(_evaluate(evaluate, model))
                if score is not None and evaluate is not None and (
                        best is None or score(entry) > score(best)):
                    best, best_w = entry, host_float64(w)
            history.append(entry)
            bar.update(1)
            bar.set_postfix(distance=f'{distance:.4f}', refresh=False)
            if checkpoint and (step % settings.checkpoint_every == 0 or last):
                save_checkpoint(checkpoint, w, {
                    'identity': identity, 'step': step, 'samples': samples,
                    'seconds': entry['seconds'], 'history': history,
                    'best': best}, best_w)
    finally:
        bar.close()
    reached = distance <= settings.threshold
    if settings.project_at_end and distance > 0:
        w = target.project(w)
        set_weights(model, layout, w)
        final = {'step': step, 'distance': 0.0, 'samples': samples,
                 'passes': samples / n_inputs, 'projected': True,
                 'projected_from': distance,
                 'seconds': time.perf_counter() - started,
                 **_evaluate(evaluate, model)}
        history.append(final)
        if score is not None and evaluate is not None and score(final) > \
                score(best):
            best, best_w = final, host_float64(w)
    return WalkResult(w, history, reached, step, samples / n_inputs, best,
                      best_w, walker.timing)


def _direction_or_zero(target, w):
    """``target.direction(w)``, or ``(None, 0.0)`` when ``w`` is in the set."""
    d, distance = target.gap(w)
    if distance == 0:
        return None, 0.0
    return d / distance, distance
