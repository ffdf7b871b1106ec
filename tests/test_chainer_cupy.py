"""Chainer 7.8.1 on the installed CuPy (14), without a GPU: Chainer's CUDA
backend imports through gradnet_cupy.chainer_compat, and every ``cupy.*`` /
``cupyx.*`` name Chainer's code uses either resolves on this CuPy or sits
behind a guard Chainer has (tests/chainer_cupy_audit.py). Without CuPy and
the cuBLAS wheel the tests are skipped, and fail when CI is set."""
import importlib.util
import json
import subprocess
import sys

import pytest

from chainer_cupy_audit import REVIEWED, audit, reviewed, summary, unguarded
from cuda_emulation import skip_or_fail


def require_cupy_with_cublas():
    """Skips (fails under CI) without CuPy and a loadable cuBLAS."""
    reason = None
    if importlib.util.find_spec('cupy') is None:
        reason = 'CuPy is not installed (pip install -e ".[test]")'
    else:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib

            load_nvidia_dynamic_lib('cublas')
        except Exception as error:  # DynamicLibNotFoundError, ImportError
            reason = f'cuBLAS not found (the nvidia-cublas-cu12 wheel): {error}'
    if reason:
        skip_or_fail(reason)


@pytest.fixture(scope='module')
def entries():
    require_cupy_with_cublas()
    return audit()


def test_chainer_cuda_backend_imports_without_a_gpu():
    require_cupy_with_cublas()
    script = ('from gradnet_cupy.chainer_compat import chainer\n'
              'import json, chainer.backends.cuda as cuda\n'
              'from gradnet_cupy.backend import gpu_available, resolve_device\n'
              'print(json.dumps([cuda.available, cuda.cudnn_enabled,\n'
              '                  gpu_available(), resolve_device("auto")]))\n')
    # -W error: the start-up warnings chainer_compat silences would fail it
    result = subprocess.run([sys.executable, '-W', 'error::UserWarning', '-c', script],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    available, cudnn, gpu, device = json.loads(result.stdout.splitlines()[-1])
    assert available and not cudnn
    assert (gpu, device) == (False, 'cpu')  # no GPU here: auto picks the CPU


def test_the_audit_finds_chainers_cupy_names(entries):
    names = {e['name'] for e in entries}
    # the imports of chainer/backends/cuda.py, and one name reached through
    # Chainer's re-export (cuda.cupy.ElementwiseKernel)
    assert {'cupy.cuda.cublas', 'cupyx.scipy.linalg', 'cupy.cuda.Stream',
            'cupy._util.PerformanceWarning', 'cupy.ElementwiseKernel'} <= names
    resolved = {e['name'] for e in entries if e['resolves']}
    assert 'cupy.ElementwiseKernel' in resolved
    # cuDNN is gone from CuPy 14; cupy.util is Chainer's fallback import
    assert {'cupy.cudnn', 'cupy.cuda.cudnn', 'cupy.util.PerformanceWarning'} <= names - resolved


def test_every_unresolved_name_is_guarded_or_reviewed(entries):
    left = [f"{name} at {o['where']} ({o['scope']})"
            for name, o in unguarded(entries) if reviewed(o) is None]
    assert not left, ('cupy names Chainer uses that neither resolve on this '
                      'CuPy nor sit behind a guard:\n' + '\n'.join(left)
                      + '\n\nthe whole audit:\n' + summary(entries))


def test_reviewed_table_has_no_stale_entries(entries):
    used = {reviewed(o) for _, o in unguarded(entries)}
    assert set(REVIEWED) <= used, set(REVIEWED) - used


def test_import_time_uses_are_guarded_by_chainer_itself(entries):
    """What runs on ``import chainer`` (module level) needs no review."""
    module_level = [f"{name} at {o['where']}" for name, o in unguarded(entries)
                    if o['scope'] == '']
    assert not module_level, module_level
