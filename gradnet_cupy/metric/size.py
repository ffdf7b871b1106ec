"""The metric's memory, counted before anything is allocated (issue #17 §3).

Its one job: how many bytes the metric of a parameter layout takes, as the
full ``n x n`` matrix, as the block-diagonal :class:`~.block_metric.BlockMetric`
of a partition and as its diagonal, per layer and in total.

Bytes per stored entry: ``G`` is float64 (``G_BYTES = 8``), its inverse
square root float32 (``ROOT_BYTES = 4``), so ``BYTES_PER_ENTRY = 12``.

- full metric: ``n ** 2`` entries, ``n ** 2 * 8`` bytes of ``G`` plus
  ``n ** 2 * 4`` of ``G^{-1/2}`` (:func:`full_metric_bytes`);
- block-diagonal: ``sum size_b ** 2`` packed entries at 12 bytes
  (:func:`metric_bytes`; with a cap on the block size,
  :func:`capped_metric_bytes`);
- diagonal: ``n`` entries at 12 bytes (the ``diagonal`` partition).

:func:`metric_bytes` is THE count: :func:`~.partition.check_memory` (the
memory check of every :class:`BlockMetric`) and :func:`metric_size` (the
``metric-size`` command) both call it. The bytes are what the metric keeps
resident on its device (NumPy or CuPy); the work arrays of ``finalize`` and
``apply`` (at most ``WORK_CHUNK`` entries each) come on top.

Example layouts without a Chainer model: :func:`resnet50_layout` (the
convolution and fully connected weights of the ImageNet ResNet-50,
25,502,912 parameters; the talk's "25.2M") and :func:`flat_layout` (one
vector of ``n`` parameters).

Neighbours: :mod:`.partition` (the blocks of a layout, and
:func:`~.partition.check_memory`, which imports this module);
:mod:`gradnet_cupy.edges.cli` (the ``metric-size`` command).
"""
import numpy as np

# a module import: partition imports this module's counts at its own import
from gradnet_cupy.metric import partition as _partition
from gradnet_cupy.tangent import ParameterEntry, ParameterLayout

G_BYTES = 8                         # G: float64
ROOT_BYTES = 4                      # G^{-1/2}: float32
BYTES_PER_ENTRY = G_BYTES + ROOT_BYTES


def metric_bytes(blocks):
    """Bytes of a block-diagonal metric over ``blocks`` (a
    :class:`~gradnet_cupy.kernels.Blocks`): ``packed_size * 12`` (int)."""
    return blocks.packed_size * BYTES_PER_ENTRY


def packed_size_with_cap(sizes, cap):
    """``sum size ** 2`` (int) after cutting blocks of ``sizes`` (int
    array) at ``cap`` (int >= 1), as :meth:`Blocks.split` does."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pieces = -(-sizes // cap)
    base, extra = np.divmod(sizes, pieces)
    return int(((pieces - extra) * base ** 2 + extra * (base + 1) ** 2).sum())


def capped_metric_bytes(sizes, cap):
    """:func:`metric_bytes` of blocks of ``sizes`` once cut at ``cap``,
    without building the cut blocks."""
    return packed_size_with_cap(sizes, cap) * BYTES_PER_ENTRY


def full_metric_bytes(n):
    """``(G bytes, G^{-1/2} bytes)`` of the full ``n x n`` metric: Python
    ints ``n ** 2 * 8`` and ``n ** 2 * 4`` (exact for any ``n``)."""
    n = int(n)
    return n * n * G_BYTES, n * n * ROOT_BYTES


def format_bytes(nbytes):
    """``nbytes`` for people: '512 bytes', '1.5 KiB' ... '2.3 PiB'."""
    nbytes = float(nbytes)
    for unit in ('bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
        if nbytes < 1024 or unit == 'PiB':
            return (f'{nbytes:.1f} {unit}' if unit != 'bytes'
                    else f'{int(nbytes)} bytes')
        nbytes /= 1024


def metric_size(layout, partition, max_block, max_bytes):
    """The metric memory of ``layout`` (a ParameterLayout), per layer.

    ``partition``, ``max_block`` (None or 0: no cap): the blocks of
    :func:`~.partition.layout_blocks`; ``max_bytes``: the budget of
    :func:`~.partition.check_memory`. Blocks never cross a layout entry, so
    each entry's blocks are built alone (a 25M-column diagonal is never held
    at once) and the totals are their sums.

    Returns a JSON-able dict: ``layers``, one dict per layout entry
    (``layer`` 'path/name', ``shape``, ``params`` n_l, ``blocks``,
    ``largest_block``, ``full_bytes`` = ``n_l ** 2 * 12`` of the entry's own
    square of the full matrix, ``block_bytes`` of its blocks,
    ``diagonal_bytes`` = ``n_l * 12``); ``total`` with ``params`` n,
    ``blocks``, ``largest_block``, ``full_g_bytes`` = ``n ** 2 * 8``,
    ``full_inverse_sqrt_bytes`` = ``n ** 2 * 4``, ``full_bytes`` (their
    sum), ``block_bytes`` (what a :class:`BlockMetric` of this partition
    keeps on its device), ``diagonal_bytes``; and ``partition``,
    ``max_block``, ``max_bytes``, ``fits`` (``block_bytes <= max_bytes``:
    the test of :func:`~.partition.check_memory`).
    """
    cap = max_block or None
    layers = []
    for entry in layout.entries:
        alone = ParameterLayout((entry._replace(offset=0),))
        blocks, _ = _partition.layout_blocks(alone, partition, cap)
        layers.append({
            'layer': f'{entry.path}/{entry.name}', 'shape': list(entry.shape),
            'params': entry.size, 'blocks': len(blocks),
            'largest_block': int(blocks.sizes.max()),
            'full_bytes': sum(full_metric_bytes(entry.size)),
            'block_bytes': metric_bytes(blocks),
            'diagonal_bytes': entry.size * BYTES_PER_ENTRY})
    n = layout.n_params
    full_g, full_root = full_metric_bytes(n)
    block_bytes = sum(layer['block_bytes'] for layer in layers)
    total = {'params': n, 'blocks': sum(layer['blocks'] for layer in layers),
             'largest_block': max(layer['largest_block'] for layer in layers),
             'full_g_bytes': full_g, 'full_inverse_sqrt_bytes': full_root,
             'full_bytes': full_g + full_root, 'block_bytes': block_bytes,
             'diagonal_bytes': n * BYTES_PER_ENTRY}
    return {'partition': partition, 'max_block': cap, 'max_bytes': max_bytes,
            'fits': block_bytes <= max_bytes, 'layers': layers,
            'total': total}


def _layout(shapes, link_type):
    """A layout of ``W`` entries of ``shapes`` [(path, shape)] in order."""
    entries, offset = [], 0
    for path, shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        entries.append(ParameterEntry(path, 'W', tuple(shape), offset, size,
                                      link_type(shape)))
        offset += size
    return ParameterLayout(tuple(entries))


# ResNet-50 (He et al. 2016, ImageNet): stages of bottleneck blocks,
# (blocks, width); each block is 1x1 in->w, 3x3 w->w, 1x1 w->4w, and the
# first block of a stage adds the 1x1 projection in->4w.
RESNET50_STEM = (64, 3, 7, 7)
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
RESNET50_CLASSES = 1000


def resnet50_layout():
    """The ParameterLayout of ResNet-50's convolution and fully connected
    weights (the package's default selection: no biases, no batch
    normalization): 54 entries, 25,502,912 parameters."""
    shapes = [('/conv1', RESNET50_STEM)]
    n_in = RESNET50_STEM[0]
    for stage, (n_blocks, width) in enumerate(RESNET50_STAGES, 1):
        for block in range(n_blocks):
            path = f'/res{stage + 1}/{block}'
            shapes += [(f'{path}/conv1', (width, n_in, 1, 1)),
                       (f'{path}/conv2', (width, width, 3, 3)),
                       (f'{path}/conv3', (4 * width, width, 1, 1))]
            if block == 0:
                shapes.append((f'{path}/proj', (4 * width, n_in, 1, 1)))
            n_in = 4 * width
    shapes.append(('/fc', (RESNET50_CLASSES, n_in)))
    return _layout(shapes, lambda shape: 'Convolution2D' if len(shape) == 4
                   else 'Linear')


def flat_layout(n):
    """One 1-D entry ``/theta/W`` of ``n`` parameters (a per-unit or
    per-layer partition makes it one block, cut at ``max_block``)."""
    return _layout([('/theta', (int(n),))], lambda shape: 'Vector')
