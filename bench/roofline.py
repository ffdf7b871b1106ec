"""A roofline model of the kernels on an H100 / H200, from counted bytes.

No GPU is needed: the bytes each launch moves between global memory and the
chip are counted exactly by the CPU emulator of the CUDA source
(tests/cuda_emulation, ``GlobalTraffic``), and this module turns them, with
the launch shape, into a predicted time. The prediction is a **model**, an
upper bound on throughput, never a measurement: bench scripts print it in
columns labelled ``model`` beside (never mixed with) their CPU timings.

The model of one launch (every figure an input or a named assumption):

* ``bytes`` = bytes read + bytes written, as counted by the emulator (no
  caches, no sector rounding: each load and store at its C++ width).
* Little's law sets the bandwidth a launch can draw: with ``resident`` =
  ``min(blocks, SMs x blocks per SM)`` thread blocks on the chip, each
  thread keeping ``in_flight`` bytes of loads outstanding, the chip has
  ``resident x threads x in_flight`` bytes in flight and draws at most that
  divided by the memory latency, and never more than the roof ``bandwidth``.
  So a launch with fewer blocks than SMs, or with few loads in flight,
  gets a fraction of the bandwidth (``blocks / SMs`` of it when each SM's
  share of the in-flight bytes is what one block supplies).
* Critical path: one thread block moves at most ``block_bytes`` (default
  ``bytes / blocks``, balanced work), at no more than its own in-flight
  bytes over the latency, nor the SM's port to L2; the launch takes at
  least that long.
* Plus a fixed ``LAUNCH_SECONDS`` per launch (queued launches overlap only
  partly; an assumption).

``time = max(bytes / drawn_bandwidth, block_bytes / block_bandwidth) +
LAUNCH_SECONDS``. Compute, shared-memory atomics, barriers and scans are
not modelled: a kernel bound by them runs below the prediction.

Device table: vendor datasheet figures (HBM bandwidth, SMs, shared memory
and L2 per GPU, boost clock) and, for the H200, the copy bandwidth measured
by bench/bench_sparsify.py on the GPU (bench/results/h200-run1/sparsify-h200.json,
read + written bytes per second of a 1 GiB device copy), which the model
uses as the roof when it is known (``roof='measured'``, the default for a
device that has one).

    python bench/roofline.py          # prints the device table
"""
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / 'bench' / 'results' / 'kernel-resources.json'

# Memory latency under load and the per-launch overhead: assumptions, of
# the order reported for Hopper by microbenchmarks (not measured here).
LATENCY_SECONDS = 600e-9
LAUNCH_SECONDS = 3e-6
SM_PORT_BYTES_PER_CYCLE = 64  # one SM's path to L2 (assumption)

DEVICES = {
    'H100-SXM': dict(hbm_GBps=3350.0, sms=132, smem_per_sm=228 * 1024,
                     smem_per_block=227 * 1024, l2_bytes=50 << 20,
                     clock_GHz=1.98, threads_per_sm=2048, blocks_per_sm=32,
                     registers_per_sm=65536, measured_copy_GBps=None),
    'H200': dict(hbm_GBps=4800.0, sms=132, smem_per_sm=228 * 1024,
                 smem_per_block=227 * 1024, l2_bytes=50 << 20,
                 clock_GHz=1.98, threads_per_sm=2048, blocks_per_sm=32,
                 registers_per_sm=65536,
                 # bench/results/h200-run1/sparsify-h200.json, copy_bandwidth_GBps
                 measured_copy_GBps=4138.7),
}
RESERVED_SMEM_PER_BLOCK = 1024


class Launch(NamedTuple):
    """One kernel launch as the model sees it.

    name: kernel; blocks, threads: grid and block size; smem: shared memory
    per block in bytes (static + dynamic); read, written: global bytes
    counted by the emulator; in_flight: bytes of global loads each thread
    keeps outstanding (from the kernel's code, e.g. 4 independent float
    loads = 16); block_bytes: bytes moved by the busiest thread block
    (None: read + written spread evenly over the blocks).
    """
    name: str
    blocks: int
    threads: int
    smem: int
    read: int
    written: int
    in_flight: int
    block_bytes: Optional[float] = None
    by_argument: Optional[dict] = None


def roof_GBps(device, roof='measured'):
    """The bandwidth roof in GB/s: the measured copy bandwidth when the
    table has one and ``roof == 'measured'``, else the datasheet HBM
    figure."""
    spec = DEVICES[device]
    if roof == 'measured' and spec['measured_copy_GBps']:
        return spec['measured_copy_GBps']
    return spec['hbm_GBps']


def blocks_per_sm(spec, threads, smem, registers=None):
    """Resident thread blocks per SM allowed by threads, shared memory and
    (when given, per thread) registers."""
    limits = [spec['blocks_per_sm'], spec['threads_per_sm'] // threads,
              spec['smem_per_sm'] // (smem + RESERVED_SMEM_PER_BLOCK)]
    if registers:
        limits.append(spec['registers_per_sm'] // (registers * threads))
    return max(0, min(limits))


def predict_launch(launch, device, roof='measured'):
    """Model seconds of one :class:`Launch` on ``device`` (module doc), and
    the terms it came from, as a dict."""
    spec = DEVICES[device]
    bandwidth = roof_GBps(device, roof) * 1e9
    nbytes = launch.read + launch.written
    per_sm = blocks_per_sm(spec, launch.threads, launch.smem)
    if per_sm == 0:
        raise ValueError(f'{launch.name}: {launch.threads} threads and '
                         f'{launch.smem} B of shared memory do not fit an SM')
    resident = min(launch.blocks, spec['sms'] * per_sm)
    block_in_flight = launch.threads * launch.in_flight
    drawn = min(bandwidth, resident * block_in_flight / LATENCY_SECONDS)
    port = SM_PORT_BYTES_PER_CYCLE * spec['clock_GHz'] * 1e9
    block_bandwidth = min(port, block_in_flight / LATENCY_SECONDS)
    block_bytes = (launch.block_bytes if launch.block_bytes is not None
                   else nbytes / max(launch.blocks, 1))
    seconds = (max(nbytes / drawn, block_bytes / block_bandwidth)
               + LAUNCH_SECONDS)
    return {'kernel': launch.name, 'blocks': launch.blocks,
            'threads': launch.threads, 'smem': launch.smem,
            'read': launch.read, 'written': launch.written,
            'resident_blocks': resident,
            'drawn_GBps': drawn / 1e9, 'seconds': seconds}


def predict(launches, device, roof='measured'):
    """Model seconds of a sequence of launches (run one after another) and
    the per-launch terms: ``{'seconds': ..., 'launches': [...]}``."""
    parts = [predict_launch(launch, device, roof) for launch in launches]
    return {'device': device, 'roof_GBps': roof_GBps(device, roof),
            'seconds': math.fsum(p['seconds'] for p in parts),
            'launches': parts}


def model_columns(launches, payload_bytes, device='H200'):
    """The ``model`` figures a bench script prints beside its measurements:
    counted bytes read and written (also per byte of the payload, e.g. of
    g), model seconds, model throughput (payload bytes per second) and its
    fraction of the roof."""
    result = predict(launches, device)
    read = sum(launch.read for launch in launches)
    written = sum(launch.written for launch in launches)
    seconds = result['seconds']
    return {'device': device, 'roof_GBps': result['roof_GBps'],
            'bytes_read': read, 'bytes_written': written,
            'read_per_payload_byte': read / payload_bytes,
            'written_per_payload_byte': written / payload_bytes,
            'seconds': seconds, 'payload_GBps': payload_bytes / seconds / 1e9,
            'fraction_of_roof': payload_bytes / seconds / 1e9
            / result['roof_GBps'],
            'launches': result['launches']}


def static_shared(kernel, arch='sm_90'):
    """Static shared memory per block of ``kernel`` (a name or CuPy name
    expression) as ptxas reports it in bench/results/kernel-resources.json
    (``python bench/kernel_resources.py``); 0 when it is not listed."""
    table = json.loads(RESOURCES.read_text())['kernels']
    return next((k['shared'] for k in table
                 if k['kernel'] == kernel and k['arch'] == arch), 0)


def counting_launcher(filename, name_expressions=(), in_flight=None,
                      block_bytes=None):
    """``(launch, launches)``: a ``launch(name, grid, block, shared_mem,
    args)`` running the kernels of ``kernels/<filename>`` on the CPU
    emulator (tests/cuda_emulation), and the list it appends a
    :class:`Launch` to per call (counted bytes, static + dynamic shared
    memory). ``in_flight``: {kernel: bytes of loads in flight per thread};
    ``block_bytes``: optional f(name, grid, args, traffic) -> bytes of the
    busiest block (None: balanced)."""
    sys.path.insert(0, str(ROOT / 'tests'))
    from cuda_emulation import package_module

    module = package_module(filename, tuple(name_expressions))
    launches = []

    def launch(name, grid, block, shared_mem, args):
        traffic = module.launch(name, grid, block, shared_mem, args)
        blocks = math.prod(grid if isinstance(grid, tuple) else (grid,))
        threads = math.prod(block if isinstance(block, tuple) else (block,))
        launches.append(Launch(
            name, blocks, threads, static_shared(name) + shared_mem,
            traffic.read, traffic.written, (in_flight or {})[name],
            block_bytes(name, grid, args, traffic) if block_bytes else None,
            traffic.by_argument))
        return traffic

    return launch, launches


def scaled(launch, factor, fixed=(), fixed_factor=1.0, blocks_factor=None):
    """A :class:`Launch` of ``factor`` times the bytes (the same busiest
    block): the launch of a batch ``factor`` times as many rows, for
    kernels whose traffic per row does not depend on the other rows. The
    traffic of the argument positions ``fixed`` (e.g. an output whose size
    does not grow with the rows) is scaled by ``fixed_factor`` instead; the
    blocks by ``blocks_factor`` (default ``factor``)."""
    fixed_read = sum(launch.by_argument[p][0] for p in fixed)
    fixed_written = sum(launch.by_argument[p][1] for p in fixed)
    blocks = factor if blocks_factor is None else blocks_factor
    return launch._replace(
        blocks=max(1, round(launch.blocks * blocks)),
        read=round((launch.read - fixed_read) * factor
                   + fixed_read * fixed_factor),
        written=round((launch.written - fixed_written) * factor
                      + fixed_written * fixed_factor))


def assumptions():
    """The model's assumptions and device table, for a results file."""
    return {'latency_s': LATENCY_SECONDS, 'launch_s': LAUNCH_SECONDS,
            'sm_port_bytes_per_cycle': SM_PORT_BYTES_PER_CYCLE,
            'devices': DEVICES,
            'roof': 'measured copy bandwidth where known, else datasheet HBM'}


def main():
    print(f'{"device":10s} {"HBM GB/s":>9s} {"roof GB/s":>9s} {"SMs":>4s} '
          f'{"smem/SM":>8s} {"L2":>6s}')
    for name, spec in DEVICES.items():
        print(f'{name:10s} {spec["hbm_GBps"]:9.0f} {roof_GBps(name):9.0f} '
              f'{spec["sms"]:4d} {spec["smem_per_sm"] // 1024:6d}Ki '
              f'{spec["l2_bytes"] >> 20:4d}Mi')
    print(f'assumptions: latency {LATENCY_SECONDS * 1e9:.0f} ns, '
          f'{LAUNCH_SECONDS * 1e6:.0f} us per launch, '
          f'{SM_PORT_BYTES_PER_CYCLE} B/cycle per SM to L2')


if __name__ == '__main__':
    main()
