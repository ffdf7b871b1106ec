"""Speed of the geodesic walk (gradnet_cupy.geodesic; not a test).

For the package's mlp and cnn on MNIST-shaped input (1x28x28, 10 classes,
seed-0 weights, the embedded MNIST digits as inputs), a magnitude target of
70% per layer and each solver (``exact``: Woodbury on the batch's
``B*10 x B*10`` Gram matrix; ``block``: the per_unit block-diagonal metric,
blocks capped at --max-block), --steps walk steps of --batch inputs are
timed: steps per second and the seconds per step spent in the logit
Jacobian, the solve and the weight update (the walk's own split; the
direction toward the target, the projection and the bookkeeping make up
the rest of ``total``). One step is run first as warm-up. The exact solver
is timed twice, with 003's step and with the anchored one (``anchor=1``:
two more forward passes of the batch per step). The block solver also
reports how far its steps are from the exact ones on one batch: ``1 - cos``
of the angle between the two ``theta`` and the ratio of their
``theta^T g theta`` under the exact metric; and the seconds one
accumulation of its blocks ``J_b^T J_b`` takes by each method
(``kernel``: ``block_outer_accumulate``, on the CPU its NumPy reference;
``dense``: a batched float64 BLAS product).

Writes bench/results/geodesic-<device>.json (or ``--out``). Runs unchanged
on a GPU.

    python bench/bench_geodesic.py [--device auto|cpu|gpu] [--steps 5]
        [--out PATH]
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np

import gradnet_cupy
from common import device_name, result_path
from gradnet_cupy.backend import resolve_device
from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.data import load_dataset
from gradnet_cupy.geodesic import (BlockSolver, MagnitudeTarget,
                                   WalkSettings, exact_step, get_weights,
                                   layout_of, walk)
from gradnet_cupy.geodesic.walk import metric_rows
from gradnet_cupy.models import build_model
from gradnet_cupy.tangent import logit_jacobian


def on_device(model, device):
    if device == 'gpu':
        model.to_device('@cupy:0')
    return model


def time_walk(arch, solver, anchor, inputs, args, device):
    data_shape = inputs.shape[1:]
    model = on_device(build_model(arch, data_shape, 10, 0), device)
    layout = layout_of(model)
    target = MagnitudeTarget(layout, 0.7)
    settings = WalkSettings(solver=solver, partition='per_unit',
                            max_block=args.max_block, batch=args.batch,
                            anchor=anchor,
                            max_steps=1, eval_every=0, project_at_end=False)
    walk(model, layout, target, inputs, settings)               # warm-up
    model = on_device(build_model(arch, data_shape, 10, 0), device)
    settings = WalkSettings(**{**settings.__dict__,
                               'max_steps': args.steps})
    start = time.perf_counter()
    result = walk(model, layout, target, inputs, settings)
    total = time.perf_counter() - start
    per_step = {k: v / result.steps for k, v in result.timing.items()}
    return {'arch': arch, 'solver': solver, 'anchor': anchor,
            'n_params': layout.n_params,
            'rows': args.batch * 10, 'steps': result.steps,
            'steps_per_s': result.steps / total,
            'seconds_per_step': {**per_step, 'total': total / result.steps}}


def block_vs_exact(arch, inputs, args, device):
    model = on_device(build_model(arch, inputs.shape[1:], 10, 0), device)
    layout = layout_of(model)
    xp = model.xp
    x = xp.asarray(inputs[:args.batch])
    with chainer.using_config('train', False):
        J = logit_jacobian(model, x, layout=layout)
    J = metric_rows(J)
    v, _ = MagnitudeTarget(layout, 0.7).direction(get_weights(model, layout))
    exact = exact_step(J, v)
    block_solver = BlockSolver(layout, 'per_unit', args.max_block)
    block = block_solver(J, v)
    gram_seconds = {}
    for method in ('kernel', 'dense'):
        solver = BlockSolver(layout, 'per_unit', args.max_block, method)
        solver.gram_blocks(J)                                   # warm-up
        start = time.perf_counter()
        solver.gram_blocks(J)
        if xp is not np:
            xp.cuda.Device().synchronize()
        gram_seconds[method] = time.perf_counter() - start

    def quad(theta):
        Jt = (J @ theta.astype(J.dtype)).astype(np.float64)
        return float(Jt @ Jt)
    cos = float(exact.theta @ block.theta) / (
        float(xp.linalg.norm(exact.theta)) * float(xp.linalg.norm(
            block.theta)))
    return {'arch': arch, 'one_minus_cos': 1 - cos,
            'quad_block_over_exact': quad(block.theta) / quad(exact.theta),
            'mu_exact': exact.mu, 'mu_block': block.mu,
            'n_blocks': len(block_solver.blocks),
            'gram_seconds': gram_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='auto')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--max-block', type=int, default=256)
    parser.add_argument('--archs', default='mlp,cnn')
    parser.add_argument('--out', default=None, help='the JSON file '
                        '(default bench/results/geodesic-<device>.json)')
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset('mnist')
    inputs = data.eval_transform(data.base[0]).astype(np.float32)
    rows, agreement = [], []
    for arch in args.archs.split(','):
        for solver, anchor in (('exact', 0.0), ('exact', 1.0),
                               ('block', 0.0)):
            row = time_walk(arch, solver, anchor, inputs, args, device)
            rows.append(row)
            split = ', '.join(f'{k} {v:.3f}' for k, v in
                              row['seconds_per_step'].items())
            print(f"{arch} {solver} anchor {anchor}: "
                  f"{row['steps_per_s']:.3f} steps/s "
                  f"(s/step: {split})", flush=True)
        agreement.append(block_vs_exact(arch, inputs, args, device))
        print(f'{arch} block vs exact: {agreement[-1]}', flush=True)
    path = Path(args.out) if args.out else result_path('geodesic', device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        'benchmark': 'geodesic', 'version': gradnet_cupy.__version__,
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
        'device': device_name(device), 'python': platform.python_version(),
        'settings': vars(args), 'walk': rows, 'block_vs_exact': agreement},
        indent=1) + '\n')
    print(f'written to {path}')


if __name__ == '__main__':
    main()
