"""What every bench script shares: the device's name, GPU-synchronised
wall-clock timing, CPU-time timing and where results go (bench/results/<name>-<device>.json,
``<device>`` being ``cpu`` or the GPU's name as a slug)."""
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / 'results'


def device_name(device):
    """The GPU's name (``device == 'gpu'``), else the CPU model and its
    logical CPU count."""
    if device == 'gpu':
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(
            cupy.cuda.Device().id)['name']
        return name.decode() if isinstance(name, bytes) else name
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r'model name\s*:\s*(.*)',
                          Path('/proc/cpuinfo').read_text())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f'{model} ({os.cpu_count()} logical CPUs)'


def synchronize(xp):
    """Wait for queued GPU work (nothing to wait for with NumPy)."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def best_time(function, xp, repeat):
    """Least wall-clock seconds of ``function()`` over ``repeat`` calls,
    after one warm-up call, GPU work included."""
    def once():
        synchronize(xp)
        start = time.perf_counter()
        function()
        synchronize(xp)
        return time.perf_counter() - start
    once()
    return min(once() for _ in range(repeat))


def best_cpu_time(function, repeat):
    """Least CPU seconds (``time.process_time``: every thread of this
    process, not the time other processes had the cores) of ``function()``
    over ``repeat`` calls, after one warm-up call. NumPy only: the measure
    that stays comparable on a shared, loaded CPU machine."""
    def once():
        start = time.process_time()
        function()
        return time.process_time() - start
    once()
    return min(once() for _ in range(repeat))


def result_path(benchmark, device):
    """bench/results/<benchmark>-<cpu | GPU name slug>.json."""
    slug = 'cpu' if device == 'cpu' else re.sub(
        r'[^a-z0-9]+', '-', device_name(device).lower()).strip('-')
    return RESULTS / f'{benchmark}-{slug}.json'
