"""The ``sparsify-path`` and ``task-path`` commands (issue #15).

Neighbours: :mod:`gradnet_cupy.cli` (the ``gradnet-cupy`` group, its shared
options and one-line errors) registers :data:`COMMANDS`; the work is done by
:mod:`.walk` and :mod:`.baselines`, the figures by :mod:`.plots`.

Both commands write into ``--out``: ``final.npz`` (the final network, a
Chainer npz of the whole model that ``extract --model`` and the package's
snapshot loader accept), ``history.json`` (settings, the path's history and
a summary) and ``path.png``; ``task-path`` also ``best.npz``, the point of
the path with the best ``min(old, new)`` test accuracy. While they run they
keep a checkpoint (``checkpoint.npz`` for the walks, ``checkpoint.json`` and
``checkpoint_model_<k>.npz`` for the trained baselines), written atomically;
the same command run again resumes from it, and it is removed at the end.
Every input is checked before anything is written.
"""
import json
import os

import click
import numpy as np

from gradnet_cupy.cli import (common_options, dataset_options,
                              load_base_model, option_group, report)
from gradnet_cupy.data import DATASETS, load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.geodesic.baselines import (finetune, interpolate, one_shot,
                                             prune_finetune)
from gradnet_cupy.geodesic.plots import plot_sparsify, plot_task_path
from gradnet_cupy.geodesic.step import BLOCK_PARTITIONS, SOLVERS
from gradnet_cupy.geodesic.targets import (SCOPES, MagnitudeTarget,
                                           StructuredTarget, WeightsTarget)
from gradnet_cupy.geodesic.walk import (DIVERGENCES, METHODS, WalkSettings,
                                        check_start, walk)
from gradnet_cupy.geodesic.weights import (get_weights, host_float64,
                                           layout_of, same_architecture,
                                           set_weights, sparsity)
from gradnet_cupy.models import MODELS
from gradnet_cupy.files import atomic_write
from gradnet_cupy.train_base import evaluate, load_snapshot, save_snapshot

SPARSIFY_METHODS = METHODS + ('prune-finetune', 'one-shot')
TASK_METHODS = METHODS + ('interpolate', 'finetune')
FINAL, BEST, HISTORY, PLOT = 'final.npz', 'best.npz', 'history.json', \
    'path.png'
WALK_CHECKPOINT = 'checkpoint.npz'
SEGMENT_CHECKPOINT = 'checkpoint.json'

walk_options = option_group(
    click.option('--solver', type=click.Choice(SOLVERS), default='exact',
                 show_default=True,
                 help='geodesic: exact metric (Woodbury on the batch) or its '
                      'block-diagonal approximation.'),
    click.option('--partition', type=click.Choice(BLOCK_PARTITIONS),
                 default='per_unit', show_default=True,
                 help='Blocks of --solver block.'),
    click.option('--max-block', type=int, default=256, show_default=True,
                 help='Cut longer blocks (0: no cap).'),
    click.option('--beta', type=float, default=1.0, show_default=True,
                 help='Weight of the pull toward the target in the step QP.'),
    click.option('--eps', type=float, default=0.01, show_default=True,
                 help='Squared step length bound (theta^T theta <= eps).'),
    click.option('--threshold', type=float, default=0.01, show_default=True,
                 help='Stop when the distance to the target is below this.'),
    click.option('--max-steps', type=int, default=500, show_default=True),
    click.option('--batch', type=int, default=16, show_default=True,
                 help='Inputs per step (metric / fip divergence).'),
    click.option('--divergence', type=click.Choice(DIVERGENCES),
                 default='kl', show_default=True,
                 help='fip: distance between output distributions.'),
    click.option('--pull', type=float, default=1.0, show_default=True,
                 help='fip: weight of the distance to the target.'),
    click.option('--anchor', type=float, default=0.0, show_default=True,
                 help="geodesic: weight of the outputs' drift from the "
                      "starting network in the step QP (0: 003's step, 1: "
                      'its Gauss-Newton model).'),
    click.option('--eval-every', type=int, default=10, show_default=True,
                 help='Evaluate on the test split every N steps.'),
    click.option('--checkpoint-every', type=int, default=10,
                 show_default=True),
    click.option('--include-bias', is_flag=True,
                 help='Move (and prune) the biases too.'))

train_options = option_group(
    click.option('--passes', type=float, default=1.0, show_default=True,
                 help='Budget of passes over the training data '
                      '(prune-finetune, finetune).'),
    click.option('--rounds', type=int, default=5, show_default=True,
                 help='prune-finetune: prune/fine-tune cycles.'),
    click.option('--lr', type=float, default=0.01, show_default=True),
    click.option('--momentum', type=float, default=0.9, show_default=True),
    click.option('--train-batch', type=int, default=32, show_default=True))


def _walk_settings(method, seed, options, **overrides):
    return WalkSettings(
        method=method, solver=options['solver'],
        partition=options['partition'], max_block=options['max_block'],
        beta=options['beta'], eps=options['eps'],
        threshold=options['threshold'], max_steps=options['max_steps'],
        batch=options['batch'], divergence=options['divergence'],
        pull=options['pull'], eval_every=options['eval_every'],
        anchor=options['anchor'] if method == 'geodesic' else 0.0,
        checkpoint_every=options['checkpoint_every'], seed=seed,
        **overrides).check()


def _train_settings(options, seed):
    return dict(batch=options['train_batch'], lr=options['lr'],
                momentum=options['momentum'], seed=seed)


def _model_ready(data, splits):
    """(x, y) of the named splits joined, ``x`` through ``eval_transform``."""
    xs, ys = zip(*(getattr(data, s) for s in splits))
    return (data.eval_transform(np.concatenate(xs)).astype(np.float32),
            np.concatenate(ys).astype(np.int32))


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(
        (json.dumps(obj, indent=1) + '\n').encode()))


def _parse_structured(text):
    layer, _, count = (text or '').partition(':')
    try:
        return layer, int(count)
    except ValueError:
        raise GradnetError(f'--structured takes LAYER:UNITS (e.g. conv1:50), '
                           f'got {text!r}') from None


class SegmentCheckpoint:
    """Resumable progress of a trained baseline in ``out``: the model after
    segment ``k`` (``checkpoint_model_<k>.npz``) and ``checkpoint.json``
    (identity, ``k``, history), each written atomically, the JSON last."""

    def __init__(self, out, identity):
        self.out, self.identity = out, identity
        self.path = os.path.join(out, SEGMENT_CHECKPOINT)

    def _model_path(self, index):
        return os.path.join(self.out, f'checkpoint_model_{index}.npz')

    def load(self, model):
        """``(segments done, history)``; the model gets the saved weights."""
        if not os.path.exists(self.path):
            return 0, []
        with open(self.path) as f:
            state = json.load(f)
        if state.get('identity') != self.identity:
            raise GradnetError(f'{self.path} is the checkpoint of another run;'
                               ' remove it or choose another --out')
        load_snapshot(model, self._model_path(state['done']))
        return state['done'], state['history']

    def save(self, model, done, history):
        save_snapshot(model, self._model_path(done))
        _write_json(self.path, {'identity': self.identity, 'done': done,
                                'history': history})
        if done > 1 and os.path.exists(self._model_path(done - 1)):
            os.remove(self._model_path(done - 1))

    def remove(self):
        if os.path.exists(self.path):
            with open(self.path) as f:
                done = json.load(f)['done']
            os.remove(self.path)
            if os.path.exists(self._model_path(done)):
                os.remove(self._model_path(done))


def _finish(out, model, record, as_json, line):
    save_snapshot(model, os.path.join(out, FINAL))
    _write_json(os.path.join(out, HISTORY), record)
    if os.path.exists(os.path.join(out, WALK_CHECKPOINT)):
        os.remove(os.path.join(out, WALK_CHECKPOINT))
    summary = {**record['summary'], 'out': out}
    report(as_json, summary, line)


@click.command('sparsify-path')
@click.option('--model', 'snapshot', required=True,
              type=click.Path(exists=True, dir_okay=False),
              help='Trained network snapshot (train-base writes them).')
@click.option('--arch', type=click.Choice(list(MODELS)), default='mlp',
              show_default=True)
@dataset_options
@click.option('--sparsity', type=float, default=None,
              help='Fraction of the weights to set to zero, in (0, 1).')
@click.option('--scope', type=click.Choice(SCOPES), default='layer',
              show_default=True,
              help='Count --sparsity per layer or over all weights.')
@click.option('--structured', default=None, metavar='LAYER:UNITS',
              help='Instead of --sparsity: remove UNITS whole output units '
                   '(filters) of LAYER, e.g. conv1:50, the ones of smallest '
                   'weight norm (add --include-bias to zero their biases '
                   'too).')
@click.option('--method', type=click.Choice(SPARSIFY_METHODS),
              default='geodesic', show_default=True)
@walk_options
@train_options
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for final.npz, history.json, path.png.')
@common_options
def sparsify_path(snapshot, arch, dataset, data_dir, subset, sparsity,
                  scope, structured, method, out, device, seed, as_json,
                  **options):
    """Move a trained network to a sparse one along a function-keeping path.

    The walk's metric and the fine-tuning use the base and gradnet splits;
    accuracies are on the test split. Re-run the same command to resume.
    """
    if (sparsity is None) == (structured is None):
        raise GradnetError('give exactly one of --sparsity and --structured')
    data = load_dataset(dataset, data_dir, subset)
    model, _ = load_base_model(snapshot, arch, data, device)
    layout = layout_of(model, options['include_bias'])
    if structured is None:
        target = MagnitudeTarget(layout, sparsity, scope)
    else:
        target = StructuredTarget(layout, *_parse_structured(structured))
    x, y = _model_ready(data, ('base', 'gradnet'))

    def test_accuracy(m):
        return {'accuracy': evaluate(m, data.test, data.eval_transform,
                                     device)}

    settings = (_walk_settings(method, seed, options) if method in METHODS
                else None)
    check_start(target, get_weights(model, layout),
                settings.threshold if settings else 0.0)
    os.makedirs(out, exist_ok=True)
    dense = test_accuracy(model)['accuracy']
    extra = {}
    if method in METHODS:
        result = walk(model, layout, target, x, settings,
                      evaluate=test_accuracy,
                      checkpoint=os.path.join(out, WALK_CHECKPOINT),
                      progress=not as_json)
        history, passes = result.history, result.passes
        extra = {'steps': result.steps, 'reached': result.reached,
                 'timing': result.timing}
    elif method == 'one-shot':
        history, passes = one_shot(model, layout, target, test_accuracy), 0.0
    else:
        identity = {'snapshot': os.path.abspath(snapshot), 'arch': arch,
                    'dataset': dataset, 'subset': subset, 'seed': seed,
                    'target': target.describe(), 'options': options}
        checkpoint = SegmentCheckpoint(out, identity)
        done, before = checkpoint.load(model)
        history = prune_finetune(
            model, layout, target, x, y, options['passes'],
            rounds=options['rounds'], evaluate=test_accuracy,
            progress=not as_json, first_round=done + 1, history=before,
            after_round=lambda r, h: checkpoint.save(model, r, h),
            **_train_settings(options, seed))
        checkpoint.remove()
        passes = options['passes']
    w = get_weights(model, layout)
    final = test_accuracy(model)['accuracy']
    summary = {'method': method, 'target': target.describe(),
               'dense_accuracy': dense, 'accuracy': final,
               'sparsity': sparsity_of_layout(w), 'passes': passes, **extra}
    history[-1].setdefault('sparsity', summary['sparsity'])
    plot_sparsify({method: history}, os.path.join(out, PLOT),
                  title=f'{arch} on {dataset}: {method}')
    _finish(out, model, {'command': 'sparsify-path', 'settings': {
        'snapshot': snapshot, 'arch': arch, 'dataset': dataset,
        'data_dir': data_dir, 'subset': subset, 'method': method,
        'seed': seed, 'device': device, **options},
        'history': history, 'summary': summary}, as_json,
        f"{method}: test accuracy {final:.4f} (dense {dense:.4f}) at "
        f"sparsity {summary['sparsity']:.3f} after {passes:.2f} pass(es); "
        f"network in {os.path.join(out, FINAL)}")


def sparsity_of_layout(w):
    """Fraction of zero weights (rounded for the summary)."""
    return round(sparsity(w), 6)


@click.command('task-path')
@click.option('--from', 'snapshot_from', required=True,
              type=click.Path(exists=True, dir_okay=False),
              help='Network trained on the old task (w1).')
@click.option('--to', 'snapshot_to', required=True,
              type=click.Path(exists=True, dir_okay=False),
              help='Network trained on the new task (w2), same architecture '
                   '(fine-tuned from w1 keeps the weights aligned).')
@click.option('--arch', type=click.Choice(list(MODELS)), default='mlp',
              show_default=True)
@click.option('--old', type=click.Choice(DATASETS), default='mnist',
              show_default=True, help='The task whose function the path '
                                      'keeps (the metric is computed on it).')
@click.option('--new', type=click.Choice(DATASETS), default='fashion-mnist',
              show_default=True)
@click.option('--old-data-dir', default=None)
@click.option('--new-data-dir', default=None)
@click.option('--subset', type=int, default=None,
              help='Keep only the first N samples of every split.')
@click.option('--method', type=click.Choice(TASK_METHODS),
              default='geodesic', show_default=True)
@click.option('--points', type=int, default=11, show_default=True,
              help='interpolate: points on the straight line.')
@walk_options
@train_options
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for final.npz, best.npz, history.json, path.png.')
@common_options
def task_path(snapshot_from, snapshot_to, arch, old, new, old_data_dir,
              new_data_dir, subset, method, points, out, device, seed,
              as_json, **options):
    """Walk from a network of the old task toward one of the new task.

    Logs both tasks' test accuracies and the distance to the second network
    along the path; best.npz is the point with the best min(old, new).
    finetune trains w1 on the new task (sequential training). Re-run the
    same command to resume.
    """
    old_data = load_dataset(old, old_data_dir, subset)
    new_data = load_dataset(new, new_data_dir, subset)
    if (old_data.in_shape, old_data.n_classes) != (new_data.in_shape,
                                                   new_data.n_classes):
        raise GradnetError(
            f'{old} ({old_data.in_shape}, {old_data.n_classes} classes) and '
            f'{new} ({new_data.in_shape}, {new_data.n_classes} classes) '
            'need one architecture: same input shape and classes')
    model, _ = load_base_model(snapshot_from, arch, old_data, device)
    target_model, _ = load_base_model(snapshot_to, arch, old_data, device)
    layout = layout_of(model, options['include_bias'])
    same_architecture(layout, layout_of(target_model,
                                        options['include_bias']))
    w1, w2 = get_weights(model, layout), get_weights(target_model, layout)

    def accuracies(m):
        return {'old': evaluate(m, old_data.test, old_data.eval_transform,
                                device),
                'new': evaluate(m, new_data.test, new_data.eval_transform,
                                device)}

    def score(entry):
        return min(entry['old'], entry['new'])

    settings = (_walk_settings(method, seed, options, project_at_end=False)
                if method in METHODS else None)
    check_start(WeightsTarget(w2), w1, settings.threshold if settings else 0.0)
    os.makedirs(out, exist_ok=True)
    start, goal = accuracies(model), accuracies(target_model)
    extra, best_w = {}, None
    if method in METHODS:
        x_old, _ = _model_ready(old_data, ('base', 'gradnet'))
        result = walk(model, layout, WeightsTarget(w2), x_old, settings,
                      evaluate=accuracies, score=score,
                      checkpoint=os.path.join(out, WALK_CHECKPOINT),
                      progress=not as_json)
        history, passes, best_w = result.history, result.passes, result.best_w
        extra = {'steps': result.steps, 'reached': result.reached,
                 'timing': result.timing}
    elif method == 'interpolate':
        history, passes = interpolate(model, layout, w1, w2, points,
                                      accuracies), 0.0
    else:
        history, passes = _finetune_segments(
            model, layout, new_data, options, seed, accuracies, score, out,
            {'from': os.path.abspath(snapshot_from), 'arch': arch,
             'new': new, 'subset': subset, 'seed': seed, 'options': options},
            not as_json)
    scored = [e for e in history if 'old' in e and 'new' in e]
    best = max(scored, key=score)
    if method == 'interpolate':
        best_w = host_float64((1 - best['t']) * w1 + best['t'] * w2)
    if best_w is not None:
        final_w = get_weights(model, layout)
        set_weights(model, layout, model.xp.asarray(best_w))
        save_snapshot(model, os.path.join(out, BEST))
        set_weights(model, layout, final_w)
    gap = float(np.linalg.norm(host_float64(w2) - host_float64(w1)))
    summary = {'method': method, 'old': old, 'new': new,
               'start': start, 'second_network': goal,
               'final': accuracies(model), 'best': best,
               'best_min_accuracy': score(best), 'distance_w1_w2': gap,
               'passes': passes, **extra}
    plot_task_path({method: history}, os.path.join(out, PLOT), 'old', 'new',
                   title=f'{arch}: {old} -> {new}, {method}')
    _finish(out, model, {'command': 'task-path', 'settings': {
        'from': snapshot_from, 'to': snapshot_to, 'arch': arch, 'old': old,
        'new': new, 'subset': subset, 'method': method, 'seed': seed,
        'device': device, **options}, 'history': history,
        'summary': summary}, as_json,
        f"{method}: best point min(old, new) = {score(best):.4f} ({old} "
        f"{best['old']:.4f}, {new} {best['new']:.4f}); start {old} "
        f"{start['old']:.4f}, second network {new} {goal['new']:.4f}; "
        f"networks in {out}")


def _finetune_segments(model, layout, data, options, seed, accuracies,
                       score, out, identity, progress):
    """Sequential fine-tuning on ``data`` in 10 resumable segments of
    ``passes / 10`` (each with its own optimizer and shuffling seed);
    best.npz is rewritten whenever a segment ends at a better score."""
    x, y = _model_ready(data, ('base', 'gradnet'))
    checkpoint = SegmentCheckpoint(out, identity)
    done, history = checkpoint.load(model)
    if done == 0:
        history = [{'passes': 0.0, **accuracies(model)}]
        save_snapshot(model, os.path.join(out, BEST))
    segments, passes = 10, options['passes']
    for k in range(done + 1, segments + 1):
        part = finetune(model, x, y, passes / segments, evaluate=accuracies,
                        eval_points=1, start_passes=passes * (k - 1) /
                        segments, progress=progress,
                        **_train_settings(options, seed + k))
        if score(part[-1]) > max(score(e) for e in history):
            save_snapshot(model, os.path.join(out, BEST))
        history.extend(part)
        checkpoint.save(model, k, history)
    checkpoint.remove()
    return history, passes


COMMANDS = [sparsify_path, task_path]
