"""Partitions of the parameter vector into metric blocks, and their memory.

Its one job: from a :class:`~gradnet_cupy.tangent.ParameterLayout` (the
selected parameter arrays in feature order, tiling ``[0, n_params)``), the
:class:`~gradnet_cupy.kernels.Blocks` a :class:`~.block_metric.BlockMetric`
keeps, and whether their packed matrices fit a memory budget.

Partitions (``partition``):

``per_layer``
    one block per layout entry (parameter array).
``per_unit``
    one block per output unit: ``W`` of shape ``(out, ...)`` flattened
    row-major holds the fan-in of unit ``u`` (a neuron's inputs, a filter's
    ``in x kh x kw`` taps) at ``offset + u * fan_in + [0, fan_in)``; a 1-D
    entry (a bias) is one block.
``diagonal``
    one block per column (``G_b`` is a number: the diagonal variant).

``max_block`` caps the block size: longer blocks are cut into near-equal
consecutive pieces (:meth:`Blocks.split`). Defaults for every metric of the
package: ``DEFAULT_PARTITION = 'per_unit'``, ``DEFAULT_MAX_BLOCK = 256``.

Memory: ``G`` (float64) and the inverse square roots (float32) take
``BYTES_PER_ENTRY = 12`` bytes per packed entry (``sum size_b ** 2``);
:func:`check_memory` counts them with :func:`.size.metric_bytes` (the count
of the ``metric-size`` command too) before anything is allocated.

Neighbours: :mod:`.block_metric` (the metric over these blocks),
:mod:`.stored` (compares a saved metric's blocks with :func:`feature_blocks`),
:mod:`.size` (the byte counts).
"""
import numpy as np

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import Blocks
from gradnet_cupy.metric.size import (
    BYTES_PER_ENTRY, capped_metric_bytes, format_bytes, metric_bytes)
from gradnet_cupy.tangent import ParameterLayout

PARTITIONS = ('per_layer', 'per_unit', 'diagonal')
DEFAULT_PARTITION = 'per_unit'
DEFAULT_MAX_BLOCK = 256
DEFAULT_MAX_BYTES = 4 << 30


def layout_blocks(layout, partition=DEFAULT_PARTITION,
                  max_block=DEFAULT_MAX_BLOCK):
    """``(blocks, segment_sizes)`` of a parameter ``layout``.

    ``layout``: a :class:`~gradnet_cupy.tangent.ParameterLayout`, checked
    here as :meth:`ParameterLayout.from_dict` checks one (contiguous
    offsets, sizes matching shapes, one block per link), then for entries
    of size >= 1 and at least one entry. ``partition``: one of
    :data:`PARTITIONS`; ``max_block``: int >= 1, or None for no cap.
    Returns :class:`Blocks` over ``layout.n_params`` columns and int64
    ``(n_links,)``: the layout's layer blocks (``layout.block_sizes``), the
    segments of the percentile re-sparsification.
    """
    if partition not in PARTITIONS:
        raise GradnetError(f"unknown partition {partition!r}: choose one of "
                           f"{', '.join(PARTITIONS)}")
    layout = ParameterLayout.from_dict(layout.to_dict())
    if not layout.entries:
        raise GradnetError('the parameter layout is empty')
    starts, sizes = [], []
    for e in layout.entries:
        if e.size < 1:
            raise GradnetError(f'layout entry {e.path}/{e.name} (shape '
                               f'{e.shape}) must have size >= 1')
        if partition == 'per_unit' and len(e.shape) >= 2:
            fan_in = e.size // e.shape[0]
            starts.extend(e.offset + fan_in * np.arange(e.shape[0]))
            sizes.extend([fan_in] * e.shape[0])
        else:
            starts.append(e.offset)
            sizes.append(e.size)
    blocks = Blocks(np.array(starts, dtype=np.int64), sizes, layout.n_params)
    if partition == 'diagonal':
        blocks = blocks.split(1)
    elif max_block is not None:
        blocks = blocks.split(max_block)
    return blocks, np.asarray(layout.block_sizes, dtype=np.int64)


def feature_blocks(layout, partition=DEFAULT_PARTITION,
                   max_block=DEFAULT_MAX_BLOCK):
    """The :class:`Blocks` of :func:`layout_blocks`, with the command
    line's convention for ``max_block``: None or 0 means no cap."""
    return layout_blocks(layout, partition, max_block or None)[0]


def check_memory(blocks, max_bytes):
    """Raises :class:`GradnetError` when the metric of ``blocks`` needs more
    than ``max_bytes``, naming the largest block-size cap that fits and the
    size of the diagonal variant."""
    need = metric_bytes(blocks)
    if need <= max_bytes:
        return
    largest = int(blocks.sizes.max())
    low, high = 0, largest          # the largest fitting cap lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        fits = capped_metric_bytes(blocks.sizes, mid)
        low, high = (mid, high) if fits <= max_bytes else (low, mid)
    diagonal = blocks.covered * BYTES_PER_ENTRY
    if low >= 1:
        advice = (f'max_block={low} fits '
                  f'({format_bytes(capped_metric_bytes(blocks.sizes, low))})'
                  f', so does the diagonal partition ({format_bytes(diagonal)})')
    elif diagonal <= max_bytes:
        advice = f'only the diagonal partition fits ({format_bytes(diagonal)})'
    else:
        advice = (f'not even the diagonal partition fits '
                  f'({format_bytes(diagonal)}): raise max_bytes')
    raise GradnetError(
        f'the block-diagonal metric needs {format_bytes(need)} ({len(blocks)} blocks '
        f'of sizes up to {largest}, {blocks.packed_size} packed entries at '
        f'{BYTES_PER_ENTRY} bytes) but max_bytes is {format_bytes(max_bytes)}; '
        f'{advice}')
