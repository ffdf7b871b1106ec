"""Pictures and GraphML of an important-edges selection.

Its one job: turn the selected edges of :mod:`.graph` into files people
open: a layered drawing per class and one overlay of all classes (PNG,
matplotlib Agg) and a GraphML graph per class (networkx). Every file is
written to a temporary name and renamed (:func:`atomic_write`).

Drawing: node layer ``j`` sits at ``x = j``, its units spread over
``y in [0, 1]``. When node layer 0 is the pixels of the image (a Linear
first layer of ``C*H*W`` inputs), it is drawn left of ``x = 0`` as an
``H x W`` heat map (channels summed) of the selected first-layer edges'
``mean_abs`` leaving each pixel (overlay: how many classes select an edge
leaving it), on top of the first-layer edges, which start at their pixel.
Edge width grows with ``mean_abs`` relative to the largest selected edge of
its layer.

GraphML: nodes ``'<layer>:<unit>'`` (attributes ``layer`` int, ``unit``
int, and ``row``/``col`` for pixels) incident to a selected edge; directed
edges input -> output with ``layer`` (1-based weight layer), ``mean_abs``
and ``frequency`` (floats).

Neighbours: :mod:`.graph` (the selection), :mod:`.cli` (the command that
writes these files).
"""
import io

import numpy as np

from gradnet_cupy.edges.graph import endpoints
from gradnet_cupy.files import atomic_write

HEAT_EXTENT = (-1.9, -0.1, 0.03, 0.97)     # x0, x1, y0, y1 of the heat map
FIRST_LAYER_ALPHA = 0.15                   # the first layer's many edges


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    return plt, LineCollection


def pixel_shape(layers, in_shape):
    """``in_shape`` (C, H, W) when node layer 0 is the image's pixels,
    else None."""
    first = layers[0]
    if first.link_type == 'Linear' and first.n_in == int(np.prod(in_shape)):
        return tuple(in_shape)
    return None


def node_positions(layers, in_shape):
    """A list over node layers of float64 (units, 2) ``(x, y)``."""
    sizes = [layers[0].n_in] + [la.n_out for la in layers]
    pixels = pixel_shape(layers, in_shape)
    positions = []
    for j, n in enumerate(sizes):
        if j == 0 and pixels is not None:
            _, height, width = pixels
            unit = np.arange(n) % (height * width)
            row, col = unit // width, unit % width
            x0, x1, y0, y1 = HEAT_EXTENT
            x = x0 + (col + 0.5) / width * (x1 - x0)
            y = y1 - (row + 0.5) / height * (y1 - y0)
        else:
            x = np.full(n, float(j))
            y = 1 - (np.arange(n) + 0.5) / n
        positions.append(np.stack([x, y], axis=1))
    return positions


def _segments(layers, positions, chosen, stats_row):
    """Per layer: (segments (m, 2, 2), relative width (m,)) of the chosen
    edges; ``stats_row(k)`` -> float64 (|E_k|,) mean_abs of one class."""
    out = []
    for k, (layer, ids) in enumerate(zip(layers, chosen)):
        o, i = endpoints(layer, ids)
        weight = stats_row(k)[ids]
        top = weight.max() if weight.size and weight.max() > 0 else 1.0
        out.append((np.stack([positions[k][i], positions[k + 1][o]], axis=1),
                    weight / top))
    return out


def _frame(plt, layers, in_shape, title, heat):
    """A figure with the node layers drawn; ``heat``: float (H, W) or
    None."""
    fig, ax = plt.subplots(figsize=(2 * len(layers) + 4, 6))
    positions = node_positions(layers, in_shape)
    start, left = 0, -0.3
    if heat is not None:
        ax.imshow(heat, cmap='Greys', extent=HEAT_EXTENT, aspect='auto',
                  zorder=3)
        start, left = 1, HEAT_EXTENT[0] - 0.1
    for j in range(start, len(positions)):
        ax.scatter(*positions[j].T, s=4, color='0.6', zorder=2)
    ticks = [(HEAT_EXTENT[0] + HEAT_EXTENT[1]) / 2 if start else 0]
    ax.set_xticks(ticks + list(range(1, len(positions))))
    ax.set_xticklabels(['input'] + [la.path.strip('/') for la in layers])
    ax.set_yticks([])
    ax.set_xlim(left, len(layers) + 0.3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    return fig, ax, positions


def _heat(layers, in_shape, values_per_input):
    pixels = pixel_shape(layers, in_shape)
    if pixels is None:
        return None
    return values_per_input.reshape(pixels).sum(axis=0)


def _save_png(fig, path, plt):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def draw_class(stats, chosen, c, in_shape, path, title):
    """The layered drawing of class ``c``'s ``chosen`` edges (per layer) as
    a PNG at ``path``."""
    plt, LineCollection = _pyplot()
    layers = stats.layers
    _, i = endpoints(layers[0], chosen[0])
    per_input = np.zeros(layers[0].n_in)
    np.add.at(per_input, i, stats.layer(0)[1][c][chosen[0]])
    fig, ax, positions = _frame(plt, layers, in_shape, title,
                                _heat(layers, in_shape, per_input))
    for k, (segments, width) in enumerate(_segments(
            layers, positions, chosen, lambda k: stats.layer(k)[1][c])):
        ax.add_collection(LineCollection(
            segments, linewidths=0.2 + 2.0 * width, colors='tab:red',
            alpha=FIRST_LAYER_ALPHA if k == 0 else 0.5, zorder=1))
    _save_png(fig, path, plt)


def draw_overlay(stats, selection, in_shape, path, title):
    """All classes' selections in one PNG at ``path``, one colour per
    class."""
    plt, LineCollection = _pyplot()
    layers = stats.layers
    per_input = np.zeros(layers[0].n_in)
    for chosen in selection:
        per_input[np.unique(endpoints(layers[0], chosen[0])[1])] += 1
    fig, ax, positions = _frame(plt, layers, in_shape, title,
                                _heat(layers, in_shape, per_input))
    colours = plt.get_cmap('tab10')
    for c, chosen in enumerate(selection):
        for segments, width in _segments(layers, positions, chosen,
                                         lambda k: stats.layer(k)[1][c]):
            ax.add_collection(LineCollection(
                segments, linewidths=0.1 + 1.2 * width,
                colors=[colours(c % 10)], alpha=0.4, zorder=1))
        ax.plot([], [], color=colours(c % 10), label=str(c))
    ax.legend(title='class', loc='upper right', fontsize='small')
    _save_png(fig, path, plt)


def class_graph(stats, chosen, c, in_shape):
    """The networkx DiGraph of class ``c``'s ``chosen`` edges (module
    docstring)."""
    import networkx as nx
    graph = nx.DiGraph(class_label=int(c))
    layers = stats.layers
    pixels = pixel_shape(layers, in_shape)

    def node(j, unit):
        name = f'{j}:{unit}'
        if name not in graph:
            extra = {}
            if j == 0 and pixels is not None:
                rest = unit % (pixels[1] * pixels[2])
                extra = {'row': int(rest // pixels[2]),
                         'col': int(rest % pixels[2])}
            graph.add_node(name, layer=j, unit=int(unit), **extra)
        return name

    for k, (layer, ids) in enumerate(zip(layers, chosen)):
        frequency, mean_abs = (a[c] for a in stats.layer(k))
        for e, o, i in zip(ids.tolist(), *endpoints(layer, ids)):
            graph.add_edge(node(k, int(i)), node(k + 1, int(o)), layer=k + 1,
                           mean_abs=float(mean_abs[e]),
                           frequency=float(frequency[e]))
    return graph


def write_graphml(graph, path):
    """``graph`` as GraphML at ``path`` (atomic)."""
    import networkx as nx
    atomic_write(path, lambda f: nx.write_graphml(graph, f))
