"""Stream discipline of the CUDA paths of percentile_sparsify and
block_outer_accumulate, checked on the CPU.

A stand-in for CuPy (:class:`FakeCupy`) runs the wrappers' CuPy code paths on
NumPy: its arrays (:class:`DeviceArray`) refuse every implicit host read
(``bool``, ``int``, ``float``, ``item``, ``tolist``, iteration) and log the
explicit ones (``get``, what ``backend.to_numpy`` calls on a CuPy array);
its ``cuda`` module logs which stream is current at each array-module call,
each kernel launch (run by the CPU emulation of the real .cu source) and
each host wait (``Stream.synchronize``). The tests check that every device
operation runs on the stream given, and that the host waits exactly where
the wrappers' docstrings say. The real thing on a GPU: tests/gpu (streams
racing a busy kernel, CUDA-graph capture, which fails on any host wait).
"""
import functools
import types

import numpy as np
import pytest

from block_outer_cases import oracle, random_csr
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (CSR, Blocks, block_outer_accumulate,
                                  percentile_sparsify)
from gradnet_cupy.kernels import _cuda, block_outer, blocks, csr, sparsify
from gradnet_cupy.kernels.sparsify import percentile_sparsify_async
from kernel_backends import make_backend
from sparsify_cases import assert_csr_identical


class HostRead(AssertionError):
    """An implicit read of a device value on the host."""


class DeviceArray(np.ndarray):
    """A NumPy array standing in for a CuPy one (see the module docstring)."""
    log = None   # set by FakeCupy
    __cuda_array_interface__ = property(lambda self: {})

    def _refuse(self, *args, **kwargs):
        raise HostRead('implicit host read of a device array')

    __bool__ = __int__ = __float__ = __index__ = __iter__ = _refuse
    item = tolist = _refuse

    def __getitem__(self, key):
        result = super().__getitem__(key)
        return (result if isinstance(result, np.ndarray)
                else np.asarray(result).view(DeviceArray))

    def get(self):
        DeviceArray.log.append(('read', FakeCupy.current))
        return np.array(self.view(np.ndarray))


class FakeStream:
    """A stream: ``with stream:`` makes it current, ``synchronize`` is a
    host wait (logged); ``capturing``: what ``is_capturing()`` says (a
    CUDA graph capture in progress)."""

    def __init__(self, name, capturing=False):
        self.name = name
        self.capturing = capturing

    def is_capturing(self):
        return self.capturing

    def __enter__(self):
        self._outer, FakeCupy.current = FakeCupy.current, self
        return self

    def __exit__(self, *exc):
        FakeCupy.current = self._outer

    def synchronize(self):
        DeviceArray.log.append(('wait', self))

    def __repr__(self):
        return self.name


class FakeCupy(types.ModuleType):
    """NumPy under CuPy's name: array-returning functions give
    DeviceArrays and log the current stream."""
    current = None
    ndarray = DeviceArray

    def __init__(self, log):
        super().__init__('cupy')
        DeviceArray.log = log
        FakeCupy.current = FakeStream('default')
        self.log = log
        self.cuda = types.SimpleNamespace(
            Device=lambda: types.SimpleNamespace(id=0),
            get_current_stream=lambda: FakeCupy.current)

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value
        if isinstance(value, np.ufunc):   # logged when called, .at kept
            return _LoggedUfunc(value, self.log)

        @functools.wraps(value)
        def call(*args, **kwargs):
            self.log.append((name, FakeCupy.current))
            result = value(*args, **kwargs)
            return (result.view(DeviceArray)
                    if isinstance(result, np.ndarray) else result)
        return call


class _LoggedUfunc:
    def __init__(self, ufunc, log):
        self._ufunc, self._log = ufunc, log

    def __call__(self, *args, **kwargs):
        self._log.append((self._ufunc.__name__, FakeCupy.current))
        result = self._ufunc(*args, **kwargs)
        return (result.view(DeviceArray)
                if isinstance(result, np.ndarray) else result)

    def __getattr__(self, name):
        self._log.append((f'{self._ufunc.__name__}.{name}', FakeCupy.current))
        return getattr(self._ufunc, name)


@pytest.fixture
def fake(monkeypatch):
    """A FakeCupy wired into the kernel modules; its log."""
    log = []
    xp = FakeCupy(log)

    def get_array_module(*arrays):
        return xp if any(isinstance(a, DeviceArray) for a in arrays) else np
    for module in (csr, sparsify, block_outer, blocks):
        monkeypatch.setattr(module, 'get_array_module', get_array_module)
    emulated = make_backend('emulated')

    def launcher(filename, name_expressions=None):
        launch = emulated.launcher(filename, name_expressions or ())

        def logged(name, grid, block, shared_mem, args):
            log.append(('launch ' + name, FakeCupy.current))
            launch(name, grid, block, shared_mem,
                   [a.view(np.ndarray) if isinstance(a, DeviceArray) else a
                    for a in args])
        return logged
    for module in (sparsify, block_outer):
        monkeypatch.setattr(module, 'launcher', launcher)
    monkeypatch.setattr(_cuda, '_constants', type(_cuda._constants)())
    return xp


def device(host):
    return np.array(host).view(DeviceArray)


def waits(log):
    """The host waits and reads of the log, in order, as (kind, stream)."""
    return [(kind, stream) for kind, stream in log
            if kind in ('read', 'wait')]


def assert_all_on(log, stream, since=0):
    strays = [(kind, s) for kind, s in log[since:] if s is not stream]
    assert not strays, f'device work off the stream {stream}: {strays}'


def test_sparsify_runs_on_the_stream_and_waits_once(fake, rng):
    sizes = [40, 60]
    g = rng.standard_normal((6, 100)).astype(np.float32)
    stream = FakeStream('s')
    for call in range(2):
        fake.log.clear()
        result = percentile_sparsify(device(g), sizes, 85.0, stream=stream)
        assert_all_on(fake.log, stream)
        # the first call uploads the plan and waits for it;
        # every call reads nnz and the NaN flag once, after the kernels
        expected = [('wait', stream)] if call == 0 else []
        assert waits(fake.log) == expected + [('read', stream)]
        kinds = [kind for kind, _ in fake.log]
        assert kinds.index('read') > kinds.index('launch sparsify_compact')
        assert_csr_identical(CSR(*(np.asarray(a) for a in result[:3]),
                                 result.shape),
                             percentile_sparsify(g, sizes, 85.0))


def test_sparsify_async_never_waits_after_warm_up(fake, rng):
    """What a CUDA-graph capture needs: no host wait or read at all."""
    g = rng.standard_normal((3, 50)).astype(np.float32)
    stream = FakeStream('capture')
    percentile_sparsify(device(g), [50], 70.0, stream=stream)   # warm-up
    fake.log.clear()
    pending = percentile_sparsify_async(device(g), [50], 70.0, stream=stream)
    assert waits(fake.log) == []
    assert_all_on(fake.log, stream)
    assert pending.stream is stream
    fake.log.clear()
    pending.result()
    assert waits(fake.log) == [('read', stream)]


def test_sparsify_reports_nonfinite_at_the_one_read(fake):
    g = np.ones((2, 10), dtype=np.float32)
    g[1, 3] = np.nan
    stream = FakeStream('s')
    pending = percentile_sparsify_async(device(g), [10], stream=stream)
    assert ('read', stream) not in fake.log
    with pytest.raises(Exception, match='NaN or Inf'):
        pending.result()


@pytest.mark.parametrize('method', ['sparse', 'dense', 'auto'])
def test_block_outer_runs_on_the_stream(fake, rng, method):
    batch, dense = random_csr(rng, 30, 80, 0.3)
    layout = Blocks([0, 10, 50], [10, 40, 25], 80)
    weights = rng.random(30).astype(np.float32)
    stream = FakeStream('s')
    on_device = CSR(*(device(a) for a in batch[:3]), batch.shape)
    for call in range(2):
        fake.log.clear()
        G = device(np.zeros(layout.packed_size))
        block_outer_accumulate(on_device, layout, G, device(weights),
                               stream=stream, method=method)
        assert_all_on(fake.log, stream)
        # validation's read, the auto dispatcher's read; on the first call
        # also the waits for the uploads of block ranges and tile lists
        got = waits(fake.log)
        assert ([w for w in got if w[0] == 'read']
                == [('read', stream)] * (2 if method == 'auto' else 1))
        assert call == 0 or [w for w in got if w[0] == 'wait'] == []
        kinds = [kind for kind, _ in fake.log]
        last_wait = max(i for i, k in enumerate(kinds) if k in ('read', 'wait'))
        sums = [i for i, k in enumerate(kinds)
                if k.startswith('launch') or k == 'matmul']
        assert sums and min(sums) > last_wait
        if method == 'dense':   # three block sizes: three chunks
            assert kinds.count('matmul') == 3
        np.testing.assert_allclose(
            np.asarray(G), oracle(dense, layout, weights), rtol=1e-6,
            atol=1e-6)


def warmed_up(fake, rng, method):
    """(CSR, Blocks, G, stream) on the fake device after one warm-up call of
    block_outer_accumulate with ``method``; the log cleared."""
    batch, _ = random_csr(rng, 12, 40, 0.3)
    layout = Blocks.contiguous([15, 25])
    on_device = CSR(*(device(a) for a in batch[:3]), batch.shape)
    stream = FakeStream('capture')
    G = device(np.zeros(layout.packed_size))
    block_outer_accumulate(on_device, layout, G, stream=stream,
                           method=method)
    fake.log.clear()
    return on_device, layout, G, stream


@pytest.mark.parametrize('method', ['sparse', 'dense'])
def test_block_outer_without_validation_never_waits(fake, rng, method):
    on_device, layout, G, stream = warmed_up(fake, rng, method)
    block_outer_accumulate(on_device, layout, G, stream=stream,
                           method=method, validate=False)
    assert waits(fake.log) == []
    assert_all_on(fake.log, stream)


@pytest.mark.parametrize('method, validate', [
    ('dense', False), ('auto', False), ('sparse', True)])
def test_capture_refuses_host_reads_and_cublas_before_queueing(
        fake, rng, method, validate):
    """Under graph capture only method='sparse' with validate=False runs
    (the call that captures, after a warm-up); anything else is one
    GradnetError raised before any device operation is queued."""
    on_device, layout, G, stream = warmed_up(fake, rng, 'sparse')
    stream.capturing = True
    block_outer_accumulate(on_device, layout, G, stream=stream,
                           method='sparse', validate=False)
    assert waits(fake.log) == [] and fake.log
    fake.log.clear()
    with pytest.raises(GradnetError, match="^CUDA graph capture needs "
                       "method='sparse' and validate=False, got "
                       f"method='{method}', validate={validate}: "):
        block_outer_accumulate(on_device, layout, G, stream=stream,
                               method=method, validate=validate)
    assert fake.log == []


def test_validation_reads_on_the_stream_before_any_kernel(fake, rng):
    """A malformed CSR is refused by the read on the given stream, before
    anything is launched (the #13 race: reads on the current stream)."""
    batch, _ = random_csr(rng, 5, 20, 0.5)
    bad = CSR(device(batch.indptr), device(batch.indices[::-1].copy()),
              device(batch.data), batch.shape)
    stream = FakeStream('s')
    with pytest.raises(Exception, match='strictly increasing'):
        block_outer_accumulate(bad, Blocks.contiguous([20]),
                               device(np.zeros(400)), stream=stream)
    assert waits(fake.log) == [('read', stream)]
    assert not any(kind.startswith('launch') for kind, _ in fake.log)
