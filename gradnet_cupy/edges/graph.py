"""The important-edges graph of a chain network (seed 000 §2.1, Fig. 1).

Its one job: from the per-sample sparsified gradients of a base network,
per class, how often each edge is kept and how large its gradient is, the
top edges of every layer, and the numbers the paper states in words.

Definitions
-----------
Units and edges. The network is a chain of weight layers (the ``W`` of the
``Linear`` and ``Convolution2D`` links of its parameter layout, in order;
the package's ``mlp`` and ``cnn``). Layer ``k`` joins the node layer
``k - 1`` (its input units) to the node layer ``k`` (its output units: the
neurons of a Linear, the filters of a convolution). Node layer 0 is the
network's input: the pixels (``C*H*W``) for a Linear first layer, the input
channels for a convolution. An input unit of a later layer is a unit of the
layer before it: a convolution's input channel, or for a Linear after a
convolution the channel of its flattened ``(C, H, W)`` input. An edge
``(o, i)`` of layer ``k`` is the set of weight entries joining them: one
``W[o, i]`` of a Linear on units, the ``kh x kw`` taps ``W[o, i, :, :]`` of a
convolution, the ``H x W`` positions of channel ``i`` for a Linear after a
convolution. Its ``taps`` columns are consecutive in a feature row, so the
edge id of column ``offset + j`` of the layer is ``j // taps`` (``o * n_in +
i``), and |E_k| = ``n_out * n_in``.

Statistics, per class ``c`` over its samples ``S_c``, from the rows ``t_s``
of :func:`~gradnet_cupy.extract.iter_sparse_tangents` (the per-sample
gradient of the loss of the true label, or of a fixed target label,
sparsified per layer at the ``q``-th percentile by
:func:`~gradnet_cupy.kernels.percentile_sparsify`):

- ``frequency[c, e]`` = the fraction of ``S_c`` in which at least one tap of
  edge ``e`` is kept;
- ``mean_abs[c, e]`` = ``sum_{s in S_c} sum_{taps} |t_s| / |S_c|`` (dropped
  entries count as 0).

Selection: in every layer ``k`` the ``ceil(alpha * |E_k|)`` edges of largest
``mean_abs`` ("the absolute weight of the edges"), ties broken by larger
``frequency``, then by smaller edge id; ``alpha * |E_k|`` is taken in
decimal (``alpha = 0.01`` of 320 edges is 3.2, so 4 edges).

Counts (the paper's "a few nodes are selected in the first layer and only
a few paths leave the second layer"): ``first_layer_nodes``, the input
units (node layer 0) with a selected edge; ``paths_from_second_layer``, the
directed paths along selected edges from node layer 1 to the output layer;
``second_layer_sources``, the node-layer-1 units that start one; Jaccard
overlaps ``|A & B| / |A | B|`` of the selected edge sets of two classes,
per layer and over all layers.

Neighbours: :mod:`gradnet_cupy.extract` (the sparsified rows),
:mod:`.draw` (pictures and GraphML of a selection), :mod:`.cli` (the
``edges`` command).
"""
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import iter_sparse_tangents

LINK_TYPES = ('Linear', 'Convolution2D')


class UnitLayer(NamedTuple):
    """One weight layer as edges between units (all ints)."""
    path: str          # link path, e.g. '/fc1'
    link_type: str     # 'Linear' or 'Convolution2D'
    offset: int        # first column of its W in a feature row
    size: int          # entries of W
    n_out: int         # output units: neurons or filters
    n_in: int          # input units
    taps: int          # consecutive columns per edge

    @property
    def n_edges(self):
        return self.n_out * self.n_in


def unit_layers(layout):
    """The chain of :class:`UnitLayer` of a ParameterLayout (``W`` of
    Linear and Convolution2D links, in order). Raises GradnetError for other
    entries or layers that do not follow one another."""
    layers = []
    for e in layout.entries:
        if e.name != 'W' or e.link_type not in LINK_TYPES:
            raise GradnetError(
                f'edges needs the W of Linear and Convolution2D links only, '
                f'got {e.path}/{e.name} ({e.link_type})')
        fan_in = e.size // e.shape[0]
        if e.link_type == 'Convolution2D':
            n_in = e.shape[1]
        elif layers:
            n_in = layers[-1].n_out
        else:
            n_in = fan_in
        after_linear = layers and e.link_type == 'Linear' == \
            layers[-1].link_type
        if (fan_in % n_in or (layers and n_in != layers[-1].n_out)
                or (after_linear and fan_in != n_in)):
            raise GradnetError(
                f'{e.path} (W {e.shape}) does not take the '
                f'{layers[-1].n_out} units of {layers[-1].path} as input: '
                'edges needs a chain of layers (mlp or cnn)')
        layers.append(UnitLayer(e.path, e.link_type, e.offset, e.size,
                                e.shape[0], n_in, fan_in // n_in))
    return tuple(layers)


def column_edges(layers):
    """int64 (n_params,): the global edge id of every column (layer ``k``'s
    edges follow those of the layers before it), and int64 (K + 1,) the
    first global id of each layer (last: the number of edges)."""
    starts = np.concatenate([[0], np.cumsum([la.n_edges for la in layers])])
    edges = np.concatenate([
        starts[k] + np.arange(la.size, dtype=np.int64) // la.taps
        for k, la in enumerate(layers)])
    return edges, starts.astype(np.int64)


class EdgeStats(NamedTuple):
    """Per-class statistics of every edge (global edge ids).

    frequency, mean_abs: float64 (n_classes, n_edges); n_samples: int64
    (n_classes,); layers: the :class:`UnitLayer` chain; edge_starts: int64
    (K + 1,) first global id per layer.
    """
    layers: tuple
    edge_starts: np.ndarray
    frequency: np.ndarray
    mean_abs: np.ndarray
    n_samples: np.ndarray

    def layer(self, k):
        """``(frequency, mean_abs)`` of layer ``k``: float64
        (n_classes, |E_k|) each."""
        lo, hi = self.edge_starts[k], self.edge_starts[k + 1]
        return self.frequency[:, lo:hi], self.mean_abs[:, lo:hi]


def edge_statistics(model, layout, x, labels, n_classes, q, *,
                    target_label=None, device='cpu', transform=None,
                    batch=64):
    """:class:`EdgeStats` of the samples ``x`` (float32 (N, C, H, W) host
    images) grouped by their true ``labels`` (int (N,)).

    The rows are the gradients of the loss of the true label, or of
    ``target_label`` (int) for every sample, sparsified per layer at ``q``
    (see the module docstring). ``model``: the base network on ``device``;
    ``layout``: its ParameterLayout; ``transform``: the dataset's eval
    transform (default none); ``batch``: samples per tangent computation.
    """
    layers = unit_layers(layout)
    labels = np.asarray(labels, dtype=np.int32)
    if labels.size == 0 or len(labels) != len(x):
        raise GradnetError(f'need as many labels as images (>= 1), got '
                           f'{len(labels)} labels for {len(x)} images')
    if labels.min() < 0 or labels.max() >= n_classes:
        raise GradnetError(f'labels must lie in 0 .. {n_classes - 1}')
    if target_label is None:
        candidates = labels
    elif not 0 <= target_label < n_classes:
        raise GradnetError(f'target label {target_label} is not in '
                           f'0 .. {n_classes - 1}')
    else:
        candidates = np.full(len(labels), target_label, dtype=np.int32)
    edges, starts = column_edges(layers)
    n_edges = int(starts[-1])
    kept = np.zeros(n_classes * n_edges, dtype=np.int64)
    abs_sum = np.zeros(n_classes * n_edges, dtype=np.float64)
    for csr, _, _, target in iter_sparse_tangents(
            model, x, labels, candidates, q, layout, device,
            transform or (lambda images: images), batch=batch):
        indptr, indices, data, target = (to_numpy(a) for a in (
            csr.indptr, csr.indices, csr.data, target))
        row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        edge = edges[indices]
        key = target[row].astype(np.int64) * n_edges + edge
        # columns ascend within a row and an edge's taps are consecutive:
        # an edge's first kept tap in a row is where the key changes
        first = np.ones(key.size, dtype=bool)
        first[1:] = key[1:] != key[:-1]
        first[1:] |= row[1:] != row[:-1]
        kept += np.bincount(key[first], minlength=kept.size)
        abs_sum += np.bincount(key, weights=np.abs(data.astype(np.float64)),
                               minlength=abs_sum.size)
    n_samples = np.bincount(labels, minlength=n_classes).astype(np.int64)
    scale = 1.0 / np.maximum(n_samples, 1)[:, None]
    return EdgeStats(layers, starts,
                     kept.reshape(n_classes, n_edges) * scale,
                     abs_sum.reshape(n_classes, n_edges) * scale, n_samples)


def edges_to_keep(n_edges, alpha):
    """``ceil(alpha * n_edges)`` with ``alpha`` in (0, 1] taken in decimal
    (int)."""
    if not 0 < alpha <= 1:
        raise GradnetError(f'alpha must be in (0, 1], got {alpha}')
    return math.ceil(Fraction(repr(float(alpha))) * n_edges)


def select_edges(stats, alpha):
    """The selected edges: a list over classes of a list over layers of
    sorted int64 local edge ids (``o * n_in + i``), ``ceil(alpha * |E_k|)``
    per layer (module docstring)."""
    selection = []
    for c in range(len(stats.n_samples)):
        per_layer = []
        for k, layer in enumerate(stats.layers):
            frequency, mean_abs = (a[c] for a in stats.layer(k))
            order = np.lexsort((np.arange(layer.n_edges), -frequency,
                                -mean_abs))
            per_layer.append(np.sort(order[:edges_to_keep(layer.n_edges,
                                                          alpha)]))
        selection.append(per_layer)
    return selection


def endpoints(layer, ids):
    """``(outputs, inputs)``: the output and input unit (int64) of each
    local edge id of ``layer``."""
    return ids // layer.n_in, ids % layer.n_in


def paths_from_second_layer(layers, chosen):
    """``(paths, sources)`` for one class's ``chosen`` edges (per layer):
    the number of paths along chosen edges from node layer 1 to the output
    layer (int), and how many node-layer-1 units start one."""
    count = np.ones(layers[-1].n_out, dtype=np.int64)   # output units
    for layer, ids in zip(layers[:0:-1], chosen[:0:-1]):
        out, inp = endpoints(layer, ids)
        upstream = np.zeros(layer.n_in, dtype=np.int64)
        np.add.at(upstream, inp, count[out])
        count = upstream
    return int(count.sum()), int((count > 0).sum())


def jaccard(sets):
    """float64 (m, m) ``|A & B| / |A | B|`` of m int arrays of distinct
    ids (1 where both are empty)."""
    m = len(sets)
    out = np.ones((m, m))
    for a in range(m):
        for b in range(a + 1, m):
            inter = np.intersect1d(sets[a], sets[b]).size
            union = sets[a].size + sets[b].size - inter
            out[a, b] = out[b, a] = inter / union if union else 1.0
    return out


def summarize(stats, selection, alpha):
    """The numbers of a selection as a JSON-able dict: per class
    (``samples``, ``selected_edges`` per layer, ``nodes`` per node layer,
    ``first_layer_nodes``, ``paths_from_second_layer``,
    ``second_layer_sources``), the layers (path, units, edges, taps, kept
    edges) and the class-by-class Jaccard overlaps, per layer and of all
    edges (lists of lists)."""
    layers = stats.layers
    classes = []
    for c, chosen in enumerate(selection):
        nodes = [set() for _ in range(len(layers) + 1)]
        for k, (layer, ids) in enumerate(zip(layers, chosen)):
            out, inp = endpoints(layer, ids)
            nodes[k].update(inp.tolist())
            nodes[k + 1].update(out.tolist())
        paths, sources = paths_from_second_layer(layers, chosen)
        classes.append({
            'class': c, 'samples': int(stats.n_samples[c]),
            'selected_edges': [int(ids.size) for ids in chosen],
            'nodes': [len(n) for n in nodes],
            'first_layer_nodes': len(nodes[0]),
            'paths_from_second_layer': paths,
            'second_layer_sources': sources})
    everything = [np.concatenate([stats.edge_starts[k] + ids
                                  for k, ids in enumerate(chosen)])
                  for chosen in selection]
    return {
        'alpha': alpha,
        'layers': [{'path': la.path, 'n_out': la.n_out, 'n_in': la.n_in,
                    'taps': la.taps, 'edges': la.n_edges,
                    'selected': edges_to_keep(la.n_edges, alpha)}
                   for la in layers],
        'classes': classes,
        'jaccard_per_layer': [
            _rounded(jaccard([chosen[k] for chosen in selection]))
            for k in range(len(layers))],
        'jaccard_all_layers': _rounded(jaccard(everything)),
        'jaccard_first_layer_nodes': _rounded(jaccard([
            np.unique(endpoints(layers[0], chosen[0])[1])
            for chosen in selection]))}


def _rounded(matrix):
    return [[round(float(v), 4) for v in row] for row in matrix]


def per_class_samples(labels, n_classes, per_class):
    """int64 indices of the first ``per_class`` samples of each class in
    ``labels`` order, ascending. Raises GradnetError when a class has
    none."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise GradnetError(f'per-class must be >= 1, got {per_class}')
    chosen = []
    for c in range(n_classes):
        found = np.flatnonzero(labels == c)[:per_class]
        if not found.size:
            raise GradnetError(f'class {c} has no samples in this split')
        chosen.append(found)
    return np.sort(np.concatenate(chosen))
