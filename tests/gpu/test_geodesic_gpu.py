"""gradnet_cupy.geodesic on CuPy against the same computation in NumPy
(skipped without CuPy and a visible CUDA device)."""
import numpy as np
import pytest

from gradnet_cupy.backend import gpu_available
from gradnet_cupy.geodesic import (BlockSolver, MagnitudeTarget, WalkSettings,
                                   exact_step, get_weights, layout_of, walk)
from gradnet_cupy.tangent import logit_jacobian
from test_geodesic import Tiny, inputs, jacobian_rows, unit

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason='needs CuPy and a CUDA device')


def on_gpu(model):
    model.to_device('@cupy:0')
    return model


def rel(a, b):
    import cupy
    a, b = cupy.asnumpy(a), cupy.asnumpy(b)
    return np.abs(a - b).max() / np.abs(b).max()


def test_exact_step_on_the_gpu_equals_the_cpu():
    import cupy
    J = jacobian_rows(Tiny(), inputs(3))
    v = unit(np.random.default_rng(2).normal(size=J.shape[1]))
    cpu = exact_step(J, v, 1.0, 0.01)
    gpu = exact_step(cupy.asarray(J), cupy.asarray(v), 1.0, 0.01)
    assert isinstance(gpu.theta, cupy.ndarray)
    assert rel(gpu.theta, cpu.theta) <= 1e-10
    assert gpu.mu == pytest.approx(cpu.mu, rel=1e-10)


@pytest.mark.parametrize('accumulate', ['kernel', 'dense'])
def test_block_step_on_the_gpu_equals_the_cpu(accumulate):
    import cupy
    model = Tiny(np.float32)
    layout = layout_of(model)
    J = jacobian_rows(model, inputs(3, np.float32))
    v = unit(np.random.default_rng(3).normal(size=J.shape[1]))
    cpu = BlockSolver(layout, 'per_unit', None, accumulate)(J, v)
    gpu = BlockSolver(layout, 'per_unit', None, accumulate, device='gpu')(
        cupy.asarray(J), cupy.asarray(v))
    assert rel(gpu.theta, cpu.theta) <= 1e-4
    assert gpu.mu == pytest.approx(cpu.mu, rel=1e-4)


@pytest.mark.parametrize('method,change,tol', [
    ('geodesic', {}, 1e-8),
    ('geodesic', {'anchor': 1.0}, 1e-8),
    # GPU: the block_outer_accumulate kernel on float32 rows ('auto');
    # CPU: the float64 product
    ('geodesic', {'solver': 'block', 'max_block': 8}, 1e-4),
    ('fip', {}, 1e-8)])
def test_walk_on_the_gpu_follows_the_cpu_walk(method, change, tol):
    settings = WalkSettings(method=method, max_steps=3, batch=3,
                            eval_every=0, **change)
    x = inputs(20)
    paths = []
    for model in (Tiny(), on_gpu(Tiny())):
        layout = layout_of(model)
        paths.append(walk(model, layout, MagnitudeTarget(layout, 0.5), x,
                          settings))
    cpu, gpu = paths
    assert rel(gpu.w, cpu.w) <= tol
    assert [e['step'] for e in gpu.history] == [e['step']
                                                for e in cpu.history]


def test_logit_jacobian_rows_feed_the_step_on_the_gpu():
    model = on_gpu(Tiny(np.float32))
    layout = layout_of(model)
    import cupy
    x = cupy.asarray(inputs(4, np.float32))
    J = logit_jacobian(model, x, layout=layout).reshape(
        -1, layout.n_params) / 2
    v, _ = MagnitudeTarget(layout, 0.5).direction(get_weights(model, layout))
    step = exact_step(J, v, 1.0, 0.01)
    assert abs(step.norm2 / 0.01 - 1) <= 1e-6
    assert step.quad < float(cupy.sum((J @ (0.1 * v).astype(np.float32))
                                      ** 2))
