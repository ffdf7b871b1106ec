"""Throughput of gradnet_cupy.tangent against what bounds it (not a test).

On the cnn and the mlp (MNIST-shaped input 1x28x28, batch 128, all 10
candidates, so 1280 rows of one sample and one candidate each), in one run:

* rows/s of the batched path (``iter_tangent_features`` with a reused
  chunk buffer, and ``tangent_features`` returning every row in fresh
  memory; default chunk budget and threads) and of the per-sample autograd
  loop (per row: cleargrads, forward of the one sample, softmax
  cross-entropy, backward, copy of the W grads; on the CPU timed with
  default and with single-threaded BLAS, the faster is the baseline);
* the FLOP rate the batched path reaches on its required arithmetic (the
  per-sample weight-gradient products, 2 FLOP per multiply-add) next to the
  float32 GEMM rate of NumPy/CuPy on the same machine;
* the bytes of features written per second next to a plain memory-copy rate
  (into already-touched memory and into fresh memory);
* where torch imports, the same network written in
  ``torch.nn`` with the weights copied across: the torch tangent source
  (``gradnet_cupy.tangent.TorchSource``, torch.func) against a per-sample
  PyTorch loop (one sample, one backward per row) and against the Chainer
  engine's batched path timed above, rows/s and rows per CPU-second, and
  the agreement of both with the engine's rows;
* on the CPU also per CPU-second (``time.process_time``, all threads of the
  process): the batched path (default threads) against the loop
  (single-threaded BLAS) and the GEMM with single-threaded BLAS. On a
  shared machine whose other jobs take cores away, wall-clock rates of a
  2-thread and a 1-thread computation are not comparable; work per
  CPU-second is.

RBM rows (``--models ...,rbm16,rbm64``): a Bernoulli RBM with 784 visible
and 16 or 64 hidden units (gradnet_cupy.rbm, seed 0), ``--batch`` random
binary samples, one row each (the free-energy objective, columns W, c, b):
rows/s of the batched engine against a per-sample autograd loop of the
same gradients, in the same run.

Writes bench/results/tangent-<device>.json (or ``--out``). Runs unchanged
on a GPU (CuPy; the torch rows with the module on CUDA, where torch has a
CUDA build; the per-CPU-second figures are CPU only).

    python bench/bench_tangent.py [--device auto|cpu|gpu] [--loop-rows 64]
        [--models cnn,mlp,rbm16,rbm64] [--out PATH]

The models are gradnet_cupy.models' ``cnn`` and ``mlp`` (seed 0).
"""
import argparse
import datetime
import json
import os
import platform

import numpy as np
from threadpoolctl import ThreadpoolController

import gradnet_cupy
from common import best_cpu_time, best_time, device_name, result_path
from gradnet_cupy import backend
from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.models import build_model, model_to_device
from gradnet_cupy.rbm import FREE_ENERGY, RBM, rbm_layout
from gradnet_cupy.tangent import (
    iter_tangent_features, parameter_layout, tangent_features)

N_CLASSES = 10
IN_SHAPE = (1, 28, 28)


def gemm_rate(xp, time):
    """float32 GEMM FLOP of a large square matmul per second of
    ``time(function) -> seconds``."""
    n = 2048 if xp is np else 8192
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)),
                   dtype=xp.float32)
    b = a.T.copy()
    return 2 * n ** 3 / time(lambda: xp.matmul(a, b))


def gemm_rate_per_cpu_s(repeats):
    """float32 GEMM FLOP per CPU-second with single-threaded BLAS."""
    with ThreadpoolController().limit(limits=1, user_api='blas'):
        return gemm_rate(np, lambda f: best_cpu_time(f, repeats))


def copy_rates(xp, repeats):
    """Bytes/s of copying 256 MiB float32: into touched and fresh memory."""
    src = xp.ones(64 * 2 ** 20, dtype=xp.float32)
    dst = xp.zeros_like(src)
    touched = best_time(lambda: xp.copyto(dst, src), xp, repeats)
    fresh = best_time(lambda: src.copy(), xp, repeats)
    return src.nbytes / touched, src.nbytes / fresh


class _Shapes(chainer.LinkHook):
    name = 'bench_shapes'

    def __init__(self):
        self.seen = []

    def forward_postprocess(self, args):
        self.seen.append((args.link, args.args[0].shape, args.out.shape))


def macs_per_row(model, x1):
    """(weight-gradient MACs, backward data-gradient MACs) per row: the
    per-sample products ``gy (x) input`` of every Linear/Convolution2D W, and
    the input gradients the backward pass needs below the last layer."""
    hook = _Shapes()
    with chainer.using_config('train', False), hook:
        model(x1)
    wgrad = data = 0
    first = True
    for link, xshape, yshape in hook.seen:
        if isinstance(link, L.Linear):
            m = link.W.size
        elif isinstance(link, L.Convolution2D):
            m = link.W.size * int(np.prod(yshape[2:]))
        else:
            continue
        wgrad += m
        if not first:
            data += m
        first = False
    return wgrad, data


def loop_rows(model, layout, x, rows, xp):
    """Per-sample autograd loop over ``rows`` (sample, candidate) pairs,
    writing the W gradients into a (rows, n_params) array."""
    by_path = dict(model.namedlinks())
    params = [getattr(by_path[e.path], e.name) for e in layout.entries]
    out = xp.empty((len(rows), layout.n_params), xp.float32)
    with chainer.using_config('train', False):
        for r, (i, c) in enumerate(rows):
            model.cleargrads()
            z = model(x[i:i + 1])
            loss = F.softmax_cross_entropy(z, xp.asarray([c], np.int32))
            loss.backward()
            for e, p in zip(layout.entries, params):
                out[r, e.offset:e.offset + e.size] = p.grad.reshape(-1)
    return out


def torch_twin(kind, model):
    """The Chainer ``cnn``/``mlp`` written as ``torch.nn`` modules with its
    weights and biases copied across (eval mode), or None without torch.
    Chainer's max pooling covers the whole input: ``ceil_mode=True``."""
    try:
        import torch
    except ImportError:
        return None
    nn = torch.nn

    def copy(module, link):
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(backend.to_numpy(
                link.W.array)))
            module.bias.copy_(torch.from_numpy(backend.to_numpy(
                link.b.array)))
        return module

    if kind == 'cnn':
        c1, c2, fc = model.conv1, model.conv2, model.fc
        layers = [
            copy(nn.Conv2d(c1.in_channels, c1.out_channels, c1.ksize,
                           padding=c1.pad), c1),
            nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            copy(nn.Conv2d(c2.in_channels, c2.out_channels, c2.ksize,
                           padding=c2.pad), c2),
            nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
            copy(nn.Linear(fc.in_size, fc.out_size), fc)]
    else:
        layers = [nn.Flatten()]
        for name in model.layer_names:
            link = model[name]
            layers += [copy(nn.Linear(link.in_size, link.out_size), link),
                       nn.ReLU()]
        layers.pop()
    return nn.Sequential(*layers).eval()


def torch_loop_rows(net, names, x, rows):
    """Per-sample autograd loop in PyTorch over ``rows`` (sample,
    candidate) pairs: zero_grad, forward of the one sample, cross-entropy,
    backward, copy of the selected grads into a (rows, n_params) array;
    without TF32, like the source."""
    import torch
    from gradnet_cupy.tangent.torch_source import ieee_precision
    params = dict(net.named_parameters())
    selected = [params[n] for n in names]
    device = selected[0].device
    out = torch.empty((len(rows), sum(p.numel() for p in selected)),
                      device=device)
    xt = torch.as_tensor(x, device=device)
    with ieee_precision(torch):     # as the source computes its rows
        for r, (i, c) in enumerate(rows):
            net.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                net(xt[i:i + 1]), torch.tensor([c], device=device))
            loss.backward()
            out[r] = torch.cat([p.grad.reshape(-1) for p in selected])
    return out.cpu().numpy()


def bench_torch(kind, model, x, batched, pairs, t_chainer, cpu_chainer,
                repeats):
    """The torch source (``TorchSource``, torch.func) on the same network
    and weights, on the device of ``x`` (NumPy: CPU; CuPy: the module moved
    to CUDA, input and rows through DLPack), against a per-sample PyTorch
    loop and the Chainer engine's time ``t_chainer`` (and, on the CPU, CPU
    seconds ``cpu_chainer``) in this run: rows/s and agreement with the
    engine's rows ``batched``. {} without torch (or, on a GPU, without a
    CUDA build of torch)."""
    net = torch_twin(kind, model)
    if net is None:
        return {}
    import torch
    from gradnet_cupy.tangent import TorchSource
    xp = backend.get_array_module(x)
    if xp is not np:
        if not torch.cuda.is_available():
            return {}
        net = net.cuda()
    source = TorchSource(net)
    rows = len(batched)
    n_loop = len(pairs)

    def consume_chunks():
        for chunk in source.iter_rows(x, candidates='all'):
            pass

    t_source = best_time(consume_chunks, xp, repeats)
    t_loop = best_time(lambda: torch_loop_rows(net, source.names, x, pairs),
                       xp, max(1, repeats // 2))
    ours = backend.to_numpy(source.rows(x, candidates='all').features)
    looped = torch_loop_rows(net, source.names, x, pairs)
    batched = backend.to_numpy(batched)
    scale = np.abs(batched).max()
    result = {
        'torch_version': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'torch_source_rows_per_s': rows / t_source,
        'torch_loop_rows_timed': n_loop,
        'torch_loop_rows_per_s': n_loop / t_loop,
        'torch_source_over_torch_loop': (rows / t_source) / (n_loop / t_loop),
        'chainer_over_torch_source': t_source / t_chainer,
        'torch_source_max_rel_err_vs_chainer': float(
            np.abs(ours - batched).max() / scale),
        'torch_loop_max_rel_err_vs_chainer': float(
            np.abs(looped - batched[:n_loop]).max() / scale),
    }
    if xp is np:
        cpu_source = best_cpu_time(consume_chunks, repeats)
        result['torch_source_rows_per_cpu_s'] = rows / cpu_source
        result['chainer_over_torch_source_per_cpu_s'] = (cpu_source
                                                          / cpu_chainer)
    return result


def bench_model(kind, xp, batch, n_loop, repeats):
    model = model_to_device(build_model(kind, IN_SHAPE, N_CLASSES, seed=0),
                      'cpu' if xp is np else 'gpu')
    x = xp.asarray(np.random.default_rng(0).standard_normal(
        (batch,) + IN_SHAPE).astype(np.float32))
    layout = parameter_layout(model)
    rows = batch * N_CLASSES
    row_bytes = layout.n_params * 4

    def consume_chunks():
        for chunk in iter_tangent_features(model, x, candidates='all',
                                           layout=layout, reuse_buffer=True):
            pass

    t_reuse = best_time(consume_chunks, xp, repeats)
    t_fresh = best_time(lambda: tangent_features(
        model, x, candidates='all', layout=layout), xp, repeats)
    pairs = [(i, c) for i in range(batch) for c in range(N_CLASSES)][:n_loop]
    t_loop = best_time(lambda: loop_rows(model, layout, x, pairs, xp), xp,
                       max(1, repeats // 2))
    t_loop_1 = t_loop
    if xp is np:     # the loop may do better with single-threaded BLAS
        with ThreadpoolController().limit(limits=1, user_api='blas'):
            t_loop_1 = best_time(
                lambda: loop_rows(model, layout, x, pairs, xp), xp,
                max(1, repeats // 2))
    batched = tangent_features(model, x, candidates='all',
                               layout=layout).features
    looped = loop_rows(model, layout, x, pairs, xp)
    agree = float(xp.abs(batched[:n_loop] - looped).max()
                  / xp.abs(looped).max())
    wgrad, data = macs_per_row(model, x[:1])
    result = {
        'n_params': layout.n_params,
        'rows': rows,
        'wgrad_macs_per_row': wgrad,
        'backward_data_macs_per_row': data,
        'batched_reuse_s': t_reuse,
        'batched_fresh_s': t_fresh,
        'batched_rows_per_s': rows / t_reuse,
        'batched_fresh_rows_per_s': rows / t_fresh,
        'loop_rows_timed': n_loop,
        'loop_rows_per_s_blas_default': n_loop / t_loop,
        'loop_rows_per_s_blas_1_thread': n_loop / t_loop_1,
        'loop_rows_per_s': n_loop / min(t_loop, t_loop_1),
        'speedup_vs_loop': (rows / t_reuse) / (n_loop / min(t_loop, t_loop_1)),
        'batched_wgrad_flops': 2 * wgrad * rows / t_reuse,
        'batched_total_flops': 2 * (wgrad + data) * rows / t_reuse,
        'batched_bytes_per_s': row_bytes * rows / t_reuse,
        'batched_fresh_bytes_per_s': row_bytes * rows / t_fresh,
        'max_rel_err_vs_loop': agree,
    }
    if xp is np:
        cpu_reuse = best_cpu_time(consume_chunks, repeats)
        with ThreadpoolController().limit(limits=1, user_api='blas'):
            cpu_loop = best_cpu_time(
                lambda: loop_rows(model, layout, x, pairs, xp),
                max(1, repeats // 2))
        result.update({
            'batched_rows_per_cpu_s': rows / cpu_reuse,
            'loop_rows_per_cpu_s': n_loop / cpu_loop,
            'speedup_vs_loop_per_cpu_s': (rows / cpu_reuse)
            / (n_loop / cpu_loop),
            'batched_wgrad_flops_per_cpu_s': 2 * wgrad * rows / cpu_reuse,
        })
    result.update(bench_torch(kind, model, x, batched, pairs, t_reuse,
                              cpu_reuse if xp is np else None, repeats))
    return result


def rbm_loop_rows(rbm, layout, v, xp):
    """Per-sample autograd loop of grad F(v): per sample cleargrads, the
    forward of the one sample, backward, copy of the selected grads."""
    by_path = dict(rbm.namedlinks())
    params = [getattr(by_path[e.path], e.name) for e in layout.entries]
    out = xp.empty((len(v), layout.n_params), xp.float32)
    with chainer.using_config('train', False):
        for r in range(len(v)):
            rbm.cleargrads()
            F.sum(rbm(v[r:r + 1])).backward()
            for e, p in zip(layout.entries, params):
                out[r, e.offset:e.offset + e.size] = p.grad.reshape(-1)
    return out


def bench_rbm(n_hidden, xp, batch, n_loop, repeats):
    """Rows/s of the RBM's per-sample free-energy gradients (W, c, b;
    784 binary visible units): batched engine against the loop."""
    rbm = model_to_device(RBM(784, n_hidden, seed=0),
                          'cpu' if xp is np else 'gpu')
    v = xp.asarray((np.random.default_rng(0).uniform(size=(batch, 784))
                    < 0.3).astype(np.float32))
    layout = rbm_layout(rbm)

    def consume_chunks():
        for chunk in iter_tangent_features(rbm, v, objective=FREE_ENERGY,
                                           layout=layout, reuse_buffer=True):
            pass

    t_batched = best_time(consume_chunks, xp, repeats)
    n_loop = min(n_loop, batch)
    t_loop = best_time(lambda: rbm_loop_rows(rbm, layout, v[:n_loop], xp),
                       xp, max(1, repeats // 2))
    batched = tangent_features(rbm, v, objective=FREE_ENERGY,
                               layout=layout).features
    looped = rbm_loop_rows(rbm, layout, v[:n_loop], xp)
    return {
        'n_params': layout.n_params, 'rows': batch,
        'batched_rows_per_s': batch / t_batched,
        'loop_rows_timed': n_loop, 'loop_rows_per_s': n_loop / t_loop,
        'speedup_vs_loop': (batch / t_batched) / (n_loop / t_loop),
        'max_rel_err_vs_loop': float(xp.abs(batched[:n_loop] - looped).max()
                                     / xp.abs(looped).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='auto')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--loop-rows', type=int, default=None,
                        help='rows timed in the per-sample loop (default: '
                        '64 on CPU, 1280 on GPU)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--models', default='cnn,mlp,rbm16,rbm64',
                        help='comma-separated: cnn, mlp, rbm<hidden units>')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    device = backend.resolve_device(args.device)
    xp = backend.array_module(device)
    n_loop = args.loop_rows or (64 if xp is np else args.batch * N_CLASSES)
    name = device_name(device)
    gemm = gemm_rate(xp, lambda f: best_time(f, xp, args.repeats))
    copy_touched, copy_fresh = copy_rates(xp, args.repeats)
    gemm_cpu = gemm_rate_per_cpu_s(args.repeats) if xp is np else None
    report = {
        'device': name,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'versions': {
            'gradnet_cupy': gradnet_cupy.__version__,
            'chainer': chainer.__version__, 'numpy': np.__version__,
            'cupy': None if xp is np else xp.__version__,
            'python': platform.python_version()},
        'cpu_count': os.cpu_count(),
        'usable_cpus': len(os.sched_getaffinity(0)),
        'load_avg_at_start': os.getloadavg(),
        'models': 'gradnet_cupy.models cnn/mlp, seed 0, input 1x28x28',
        'candidates': 'all', 'batch': args.batch,
        'gemm_f32_flops': gemm,
        'gemm_f32_flops_per_cpu_s_1_thread': gemm_cpu,
        'copy_bytes_per_s_touched': copy_touched,
        'copy_bytes_per_s_fresh': copy_fresh,
    }
    for kind in args.models.split(','):
        if kind.startswith('rbm'):
            report[kind] = bench_rbm(int(kind[3:]), xp, args.batch, n_loop,
                                     args.repeats)
            continue
        r = bench_model(kind, xp, args.batch, n_loop, args.repeats)
        r['wgrad_flops_over_gemm'] = r['batched_wgrad_flops'] / gemm
        r['bytes_over_copy_touched'] = r['batched_bytes_per_s'] / copy_touched
        if gemm_cpu:
            r['wgrad_flops_over_gemm_per_cpu_s'] = (
                r['batched_wgrad_flops_per_cpu_s'] / gemm_cpu)
        report[kind] = r
    report['load_avg_at_end'] = os.getloadavg()
    out = args.out or result_path('tangent', device)
    with open(out, 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print('wrote', out)


if __name__ == '__main__':
    main()
