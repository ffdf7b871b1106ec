"""Geodesic sparsification and task paths on MNIST (issue #15, seed 003).

Three parts, each printing a table (and writing it to --out):

``sparsify`` (the mlp)
    The package's mlp is trained on the base + gradnet splits of the
    embedded MNIST (4,000 digits) and tested on its test split (1,000).
    For every --sparsities level: the geodesic walk, the fip walk, one-shot
    magnitude pruning, each followed by --finetune-passes passes of masked
    fine-tuning (0: none; with --equal-passes one-shot gets the geodesic's
    total instead), and iterative prune + fine-tune given the
    geodesic's passes (walk + fine-tuning); the final sparse network's test
    accuracy (and before the fine-tuning), passes and wall time per method.
``structured`` (the cnn)
    Remove --filters of conv1's 64 filters (weights and biases) with each of
    --structured-methods: the geodesic or fip walk (metric on the training
    digits), one-shot removal, or iterative removal in --rounds rounds of
    --recover-step passes of fine-tuning; then masked fine-tuning in steps
    of --recover-step passes until the test accuracy is within 1 point of
    the dense network's (at most --recover-max passes in all); the passes
    each method needs.
``task`` (the mlp)
    w1 = the MNIST mlp; w2 = w1 fine-tuned on Fashion-MNIST (the choice
    that keeps the weights aligned); paths from w1 toward w2: geodesic and
    fip (metric on MNIST inputs only), the straight line, and sequential
    fine-tuning of w1 on Fashion-MNIST. For each, the best point by
    min(MNIST, Fashion-MNIST) test accuracy. The walks and the line move
    the weights W only, or W and the biases with --task-bias.

Networks are trained once and reused from --nets (default --out; delete
them to retrain); walks use the training inputs (base + gradnet splits).

    python examples/geodesic_mnist.py --out runs/geodesic --parts sparsify \
        --finetune-passes 0.5
    python examples/geodesic_mnist.py --out runs/geodesic --parts structured \
        --recover-max 4
    python examples/geodesic_mnist.py --out runs/geodesic --parts task \
        --fashion-dir /usr/share/datasets/fashion-mnist --fashion-subset 2000 \
        --task-bias

(Fashion-MNIST: ``apt-get install dataset-fashion-mnist``.) The commands
that made the tables of docs/geodesic.rst are listed there.
"""
import argparse
import copy
import dataclasses
import json
import os
import time

import numpy as np

from gradnet_cupy.backend import resolve_device
from gradnet_cupy.files import atomic_write
from gradnet_cupy.data import load_dataset
from gradnet_cupy.geodesic import (MagnitudeTarget, StructuredTarget,
                                   WalkSettings, WeightsTarget, finetune,
                                   get_weights, interpolate, layout_of,
                                   one_shot, prune_finetune, walk)
from gradnet_cupy.geodesic.step import BLOCK_PARTITIONS, SOLVERS
from gradnet_cupy.geodesic.plots import plot_sparsify, plot_task_path
from gradnet_cupy.train_base import (evaluate, load_base, load_snapshot,
                                     save_snapshot, train_base)

PARTS = ('sparsify', 'structured', 'task')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--nets', default=None,
                        help='Folder of the trained networks (default: '
                             '--out); shared by several runs.')
    parser.add_argument('--parts', default='sparsify',
                        help=f"Comma-separated, of {', '.join(PARTS)}.")
    parser.add_argument('--device', default='auto')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--base-epochs', type=int, default=20)
    parser.add_argument('--sparsities', default='0.5,0.7,0.9')
    parser.add_argument('--scope', default='layer')
    parser.add_argument('--methods', default='geodesic,fip,one-shot,'
                                             'prune-finetune')
    parser.add_argument('--beta', type=float, default=1.0)
    parser.add_argument('--eps', type=float, default=0.01)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--solver', default='exact', choices=SOLVERS,
                        help='Step solver of the geodesic walk: exact '
                             '(Woodbury, metric of rank B*10) or block '
                             '(block-diagonal metric, full rank per block).')
    parser.add_argument('--partition', default='per_unit',
                        choices=BLOCK_PARTITIONS,
                        help='Blocks of --solver block.')
    parser.add_argument('--max-block', type=int, default=256,
                        help='Longest block of --solver block (longer ones '
                             'are cut).')
    parser.add_argument('--max-steps', type=int, default=400)
    parser.add_argument('--pull', type=float, default=1.0)
    parser.add_argument('--threshold', type=float, default=0.01,
                        help='Walks stop when the distance to the target '
                             'falls below this (003: 0.01), then project.')
    parser.add_argument('--anchor', type=float, default=0.0,
                        help='Geodesic walks: weight of the drift from the '
                             "starting network's outputs in the step QP (0: "
                             "003's step; 1: the Gauss-Newton model; "
                             'docs/geodesic.rst).')
    parser.add_argument('--eval-every', type=int, default=20)
    parser.add_argument('--finetune-passes', type=float, default=0.0,
                        help='Masked fine-tuning after the walk or one-shot '
                             'pruning, counted in the passes; prune + '
                             'fine-tune gets the same total.')
    parser.add_argument('--equal-passes', action='store_true',
                        help='One-shot pruning is fine-tuned for the '
                             "geodesic's total passes (walk + "
                             '--finetune-passes) instead of '
                             '--finetune-passes, so that it spends as many '
                             'passes as the geodesic and prune + fine-tune.')
    parser.add_argument('--filters', type=int, default=50)
    parser.add_argument('--cnn-epochs', type=int, default=3)
    parser.add_argument('--structured-methods',
                        default='geodesic,fip,one-shot,prune-finetune')
    parser.add_argument('--rounds', type=int, default=5,
                        help='Removal rounds of the structured prune + '
                             'fine-tune (--recover-step passes each).')
    parser.add_argument('--recover-step', type=float, default=0.25)
    parser.add_argument('--recover-max', type=float, default=10.0)
    parser.add_argument('--fashion-dir', default=None)
    parser.add_argument('--fashion-subset', type=int, default=4000)
    parser.add_argument('--task-epochs', type=float, default=5.0)
    parser.add_argument('--points', type=int, default=21)
    parser.add_argument('--task-bias', action='store_true',
                        help='task: the walks and the straight line move '
                             'the biases too (default: only the weights W; '
                             'the biases stay at w1\'s).')
    return parser.parse_args()


def joined(data):
    """Model-ready (x, y) of the base and gradnet splits together."""
    x = np.concatenate([data.base[0], data.gradnet[0]])
    y = np.concatenate([data.base[1], data.gradnet[1]])
    return data.eval_transform(x).astype(np.float32), y.astype(np.int32)


def trained(data, arch, folder, epochs, seed, device):
    """The network ``arch`` trained on base + gradnet (reused if saved)."""
    if not os.path.exists(os.path.join(folder, 'snapshots.json')):
        x, y = joined(data)
        train_base(dataclasses.replace(data, base=(x, y)), arch, folder,
                   epochs=epochs, seed=seed, device=device, overwrite=True)
    model, _, record = load_base(folder, device=device)
    return model


def accuracy(data, device, name='accuracy'):
    def measure(model):
        return {name: evaluate(model, data.test, data.eval_transform,
                               device)}
    return measure


def settings(args, method, **extra):
    anchor = args.anchor if method == 'geodesic' else 0.0
    return WalkSettings(method=method, beta=args.beta, eps=args.eps,
                        anchor=anchor, threshold=args.threshold,
                        batch=args.batch, max_steps=args.max_steps,
                        solver=args.solver, partition=args.partition,
                        max_block=args.max_block,
                        pull=args.pull, eval_every=args.eval_every,
                        seed=args.seed, **extra)


def table(rows, columns):
    """A plain-text table of dicts (floats to 4 digits)."""
    text = [[(f'{r[c]:.4f}' if isinstance(r[c], float) else str(r[c]))
             for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text))
              for i, c in enumerate(columns)]
    line = '  '.join(c.ljust(w) for c, w in zip(columns, widths))
    return '\n'.join([line, '-' * len(line)] + [
        '  '.join(v.ljust(w) for v, w in zip(t, widths)) for t in text])


def report(args, name, rows, columns, extra=None):
    text = table(rows, columns)
    print(f'\n{name}\n{text}', flush=True)
    with open(os.path.join(args.out, f'{name}.txt'), 'w') as f:
        f.write(text + '\n')
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
        json.dump({'rows': rows, **(extra or {})}, f, indent=1)


def mnist_network(args, device, arch, epochs):
    """(trained ``arch`` on the embedded MNIST, its test-accuracy function,
    its dense test accuracy, training (x, y))."""
    data = load_dataset('mnist')
    base = trained(data, arch, os.path.join(args.nets, f'{arch}_mnist'),
                   epochs, args.seed, device)
    measure = accuracy(data, device)
    return base, measure, measure(base)['accuracy'], joined(data)


def walked(args, model, name, run):
    """``(history, passes, steps)`` of the walk ``run()`` (moving ``model``);
    its end point is saved to --out as ``walk_NAME.npz`` (+ ``.json``) and
    reused by a later run with the same --out (delete them to walk again),
    so that other --finetune-passes cost no walk."""
    path = os.path.join(args.out, f'walk_{name}')
    if os.path.exists(path + '.json'):
        load_snapshot(model, path + '.npz')
        with open(path + '.json') as f:
            saved = json.load(f)
        return saved['history'], saved['passes'], saved['steps']
    result = run()
    save_snapshot(model, path + '.npz')
    saved = {'history': result.history, 'passes': result.passes,
             'steps': result.steps}
    atomic_write(path + '.json', lambda f: f.write(json.dumps(saved).encode()))
    return result.history, result.passes, result.steps


def sparsify(args, device):
    base, measure, dense, (x, y) = mnist_network(args, device, 'mlp',
                                                 args.base_epochs)
    rows, histories = [], {}
    for p in [float(s) for s in args.sparsities.split(',')]:
        budget, curves = None, {}
        for method in args.methods.split(','):
            model = copy.deepcopy(base)
            layout = layout_of(model)
            target = MagnitudeTarget(layout, p, args.scope)
            start = time.perf_counter()
            steps = 0
            if method in ('geodesic', 'fip'):
                history, passes, steps = walked(
                    args, model, f'{method}_{p}', lambda: walk(
                        model, layout, target, x, settings(args, method),
                        evaluate=measure, progress=True))
                if method == 'geodesic':
                    budget = passes
            elif method == 'one-shot':
                history, passes = one_shot(model, layout, target,
                                           measure), 0.0
            else:
                passes = (budget or 0.0) + args.finetune_passes or 1.0
                history = prune_finetune(model, layout, target, x, y, passes,
                                         rounds=5, evaluate=measure,
                                         seed=args.seed)
            before = measure(model)['accuracy']
            tune = ((budget or 0.0) + args.finetune_passes
                    if method == 'one-shot' and args.equal_passes
                    else args.finetune_passes)
            if method != 'prune-finetune' and tune > 0:
                history = history + finetune(
                    model, x, y, tune, layout=layout,
                    mask=get_weights(model, layout) == 0, evaluate=measure,
                    eval_points=1, seed=args.seed, start_passes=passes)
                passes += tune
            final = measure(model)['accuracy']
            w = get_weights(model, layout)
            rows.append({'sparsity': p, 'method': method,
                         'accuracy': final, 'before_finetune': before,
                         'dense': dense, 'passes': float(passes),
                         'steps': steps, 'zeros': float((w == 0).mean()),
                         'seconds': time.perf_counter() - start})
            curves[method] = history
            print(f"sparsity {p}: {method} accuracy {final:.4f} "
                  f"(dense {dense:.4f}) passes {passes:.3f}", flush=True)
        plot_sparsify(curves, os.path.join(args.out, f'sparsify_{p}.png'),
                      title=f'mlp on MNIST, sparsity {p}')
        histories[str(p)] = curves
    report(args, 'sparsify', rows, ['sparsity', 'method', 'accuracy',
                                    'before_finetune', 'dense', 'passes',
                                    'steps', 'zeros', 'seconds'],
           {'histories': histories, 'args': vars(args)})


def passes_to_recover(model, layout, x, y, dense, measure, args, spent):
    """Masked fine-tuning in steps of --recover-step passes until the test
    accuracy is within 1 point of ``dense``; returns the total passes (None
    when --recover-max is reached first) and the accuracy."""
    mask = get_weights(model, layout) == 0
    acc = measure(model)['accuracy']
    while acc < dense - 0.01:
        if spent >= args.recover_max:
            return None, acc
        finetune(model, x, y, args.recover_step, layout=layout, mask=mask,
                 eval_points=1, seed=args.seed + int(spent * 100))
        spent += args.recover_step
        acc = measure(model)['accuracy']
    return spent, acc


def structured(args, device):
    base, measure, dense, (x, y) = mnist_network(args, device, 'cnn',
                                                 args.cnn_epochs)
    rows, curves = [], {}
    for method in args.structured_methods.split(','):
        model = copy.deepcopy(base)
        layout = layout_of(model, include_bias=True)
        target = StructuredTarget(layout, 'conv1', args.filters)
        start = time.perf_counter()
        if method in ('geodesic', 'fip'):
            result = walk(model, layout, target, x,
                          settings(args, method), evaluate=measure,
                          progress=True)
            walked, curves[method] = result.passes, result.history
        elif method == 'one-shot':
            walked, curves[method] = 0.0, one_shot(model, layout, target,
                                                   measure)
        else:       # iterative: --rounds removals, --recover-step each
            walked = args.rounds * args.recover_step
            curves[method] = prune_finetune(
                model, layout, target, x, y, walked, rounds=args.rounds,
                evaluate=measure, seed=args.seed)
        after = measure(model)['accuracy']
        total, final = passes_to_recover(model, layout, x, y, dense, measure,
                                         args, walked)
        rows.append({'method': method, 'dense': dense, 'after_removal':
                     after, 'walk_passes': walked,
                     'passes_within_1_point': ('>' + str(args.recover_max)
                                               if total is None else total),
                     'accuracy': final,
                     'seconds': time.perf_counter() - start})
        print(f"structured: {method} after removal {after:.4f} within 1 "
              f"point after {rows[-1]['passes_within_1_point']} passes",
              flush=True)
    report(args, 'structured', rows, ['method', 'dense', 'after_removal',
                                      'walk_passes', 'passes_within_1_point',
                                      'accuracy', 'seconds'],
           {'histories': curves, 'args': vars(args)})


def task(args, device):
    mnist = load_dataset('mnist')
    fashion = load_dataset('fashion-mnist', args.fashion_dir,
                           args.fashion_subset)
    w1_model = trained(mnist, 'mlp', os.path.join(args.nets, 'mlp_mnist'),
                       args.base_epochs, args.seed, device)

    def both(model):
        return {'mnist': evaluate(model, mnist.test, mnist.eval_transform,
                                  device),
                'fashion': evaluate(model, fashion.test,
                                    fashion.eval_transform, device)}

    def score(entry):
        return min(entry['mnist'], entry['fashion'])

    xf, yf = joined(fashion)
    w2_path = os.path.join(args.nets, 'mlp_fashion_from_mnist.npz')
    w2_model = copy.deepcopy(w1_model)
    if os.path.exists(w2_path):
        load_snapshot(w2_model, w2_path)
    else:
        finetune(w2_model, xf, yf, args.task_epochs, seed=args.seed)
        save_snapshot(w2_model, w2_path)
    layout = layout_of(w1_model, include_bias=args.task_bias)
    w1, w2 = get_weights(w1_model, layout), get_weights(w2_model, layout)
    xm, _ = joined(mnist)
    rows, curves = [], {}
    for method in ('geodesic', 'fip', 'interpolate', 'finetune'):
        model = copy.deepcopy(w1_model)
        start = time.perf_counter()
        if method in ('geodesic', 'fip'):
            result = walk(model, layout, WeightsTarget(w2), xm,
                          settings(args, method, project_at_end=False),
                          evaluate=both, score=score, progress=True)
            history, passes = result.history, result.passes
        elif method == 'interpolate':
            history, passes = interpolate(model, layout, w1, w2, args.points,
                                          both), 0.0
        else:
            history = [{'passes': 0.0, **both(model)}] + finetune(
                model, xf, yf, args.task_epochs, evaluate=both,
                eval_points=args.points - 1, seed=args.seed)
            passes = args.task_epochs
        scored = [e for e in history if 'mnist' in e]
        best = max(scored, key=score)
        curves[method] = [{**e, 'old': e['mnist'], 'new': e['fashion']}
                          for e in scored]
        rows.append({'method': method, 'best_min': score(best),
                     'mnist_at_best': best['mnist'],
                     'fashion_at_best': best['fashion'],
                     'mnist_end': scored[-1]['mnist'],
                     'fashion_end': scored[-1]['fashion'],
                     'passes': float(passes),
                     'seconds': time.perf_counter() - start})
    plot_task_path(curves, os.path.join(args.out, 'task_path.png'),
                   'old', 'new', title='mlp: MNIST -> Fashion-MNIST')
    report(args, 'task', rows, ['method', 'best_min', 'mnist_at_best',
                                'fashion_at_best', 'mnist_end',
                                'fashion_end', 'passes', 'seconds'],
           {'w1': both(w1_model), 'w2': both(w2_model),
            'histories': curves, 'args': vars(args)})


def main():
    args = parse_args()
    device = resolve_device(args.device)
    args.nets = args.nets or args.out
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.nets, exist_ok=True)
    runners = {'sparsify': sparsify, 'structured': structured, 'task': task}
    for part in args.parts.split(','):
        if part not in runners:
            raise SystemExit(f"unknown part {part!r}: choose from "
                             f"{', '.join(PARTS)}")
        started = time.perf_counter()
        runners[part](args, device)
        print(f'{part}: {time.perf_counter() - started:.0f} s wall time',
              flush=True)


if __name__ == '__main__':
    main()
