"""Figures of geodesic runs (matplotlib, Agg backend, PNG written atomically).

Neighbours: :mod:`.cli` and ``examples/geodesic_mnist.py`` draw the
histories of :mod:`.walk` and :mod:`.baselines` with these.

:func:`plot_sparsify`: test accuracy against passes over the data, one line
per method (several methods on one figure), the sparsity or distance of
each point in the legend's label of its last point.
:func:`plot_task_path`: both tasks' accuracies (solid: old task, dashed: new
task) and the distance to ``w2`` (right axis) along each method's path; the
x axis is the position along the path (entry index scaled to [0, 1]).
"""
import io

from gradnet_cupy.files import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=110, bbox_inches='tight')
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_sparsify(histories, path, metric='accuracy', title=None):
    """``histories``: ``{method: history}`` (lists of dicts with ``passes``
    and ``metric``); entries without ``metric`` are skipped. Writes a PNG
    to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, history in histories.items():
        points = [(e['passes'], e[metric]) for e in history if metric in e]
        if not points:
            continue
        xs, ys = zip(*points)
        last = history[-1]
        label = method + (f" (sparsity {last['sparsity']:.2f})"
                          if 'sparsity' in last else '')
        ax.plot(xs, ys, marker='.', label=label)
    ax.set_xlabel('passes over the training data')
    ax.set_ylabel(f'test {metric}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    if title:
        ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def plot_task_path(histories, path, old, new, title=None):
    """``histories``: ``{method: history}`` whose entries hold the accuracy
    keys ``old`` and ``new`` (and optionally ``distance`` to ``w2``).
    Writes a PNG to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    right = ax.twinx()
    for i, (method, history) in enumerate(histories.items()):
        color = f'C{i}'
        scored = [e for e in history if old in e and new in e]
        if not scored:
            continue
        xs = [j / max(len(scored) - 1, 1) for j in range(len(scored))]
        ax.plot(xs, [e[old] for e in scored], color=color,
                label=f'{method}: {old}')
        ax.plot(xs, [e[new] for e in scored], color=color, linestyle='--',
                label=f'{method}: {new}')
        if all('distance' in e for e in scored):
            right.plot(xs, [e['distance'] for e in scored], color=color,
                       linestyle=':', alpha=0.6)
    ax.set_xlabel('position along the path')
    ax.set_ylabel('test accuracy (solid: old task, dashed: new task)')
    right.set_ylabel('distance to the second network (dotted)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='lower left')
    if title:
        ax.set_title(title)
    _save(fig, path)
    plt.close(fig)
