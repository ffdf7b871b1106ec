"""Chainer 7.8.1 under the installed NumPy, through gradnet_cupy.chainer_compat."""
import json
import subprocess
import sys
import textwrap

import numpy as np

from gradnet_cupy.chainer_compat import chainer, F, L


def test_chainer_version_and_tiny_backward(rng):
    assert chainer.__version__ == '7.8.1'
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = np.array([0, 2, 1, 2], np.int32)
    link = L.Linear(3, 3)
    loss = F.softmax_cross_entropy(link(x), t)
    link.cleargrads()
    loss.backward()
    # Oracle in plain NumPy: d CE / d logits = (softmax - onehot) / N.
    logits = x @ link.W.array.T + link.b.array
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(3)[t]) / len(t)
    np.testing.assert_allclose(link.W.grad, delta.T @ x, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(link.b.grad, delta.sum(0), rtol=1e-5,
                               atol=1e-6)
    assert np.isclose(float(loss.array),
                      -np.log(p[np.arange(4), t]).mean(), rtol=1e-5)


SCRIPT = textwrap.dedent('''
    import json, sys
    for name in sys.argv[1:]:
        sys.modules[name] = None       # makes "import name" fail
    import numpy as np
    had = 'sctypes' in np.__dict__
    before = np.__dict__.get('sctypes')
    from gradnet_cupy.chainer_compat import chainer, F
    x = chainer.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    F.sum(F.relu(x) * 2).backward()
    print(json.dumps({
        'numpy': np.__version__, 'had_sctypes': had,
        'same_object': np.__dict__.get('sctypes') is before,
        'float32_listed': np.float32 in np.sctypes['float'],
        'grad': x.grad.tolist()}))
''')


def run_fresh(*blocked):
    """Import chainer_compat in a fresh interpreter, some modules blocked."""
    proc = subprocess.run([sys.executable, '-c', SCRIPT, *blocked],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sctypes_shim_only_where_needed():
    info = run_fresh()
    assert info['numpy'] == np.__version__
    assert info['float32_listed']
    assert info['grad'] == [[0.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    numpy_major = int(np.__version__.split('.')[0])
    # NumPy 1.x keeps its own np.sctypes; NumPy 2 lost it and gets the shim.
    assert info['had_sctypes'] == (numpy_major < 2)
    assert info['same_object'] == (numpy_major < 2)


def test_works_without_pkg_resources_and_numpy_distutils():
    info = run_fresh('pkg_resources', 'numpy.distutils',
                     'numpy.distutils.system_info')
    assert info['grad'] == [[0.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
