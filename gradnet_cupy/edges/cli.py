"""The ``edges`` and ``metric-size`` commands (issue #17).

Neighbours: :mod:`gradnet_cupy.cli` (the ``gradnet-cupy`` group, its shared
options and one-line errors) loads :data:`COMMANDS` on first use; the work
is done by
:mod:`.graph` and :mod:`.draw` (edges) and
:mod:`gradnet_cupy.metric.size` (metric-size).

``edges --out DIR`` writes ``DIR/edges.json`` (settings and the numbers of
:func:`~.graph.summarize`), ``DIR/class_<c>.png`` and
``DIR/class_<c>.graphml`` per class and ``DIR/overlay.png``, each file
atomically; every input is checked before anything is written.
"""
import json
import os

import click

from gradnet_cupy.cli import (base_model_options, common_options,
                              dataset_options, load_base_model, report)
from gradnet_cupy.data import load_dataset
from gradnet_cupy.edges.draw import (class_graph, draw_class, draw_overlay,
                                     write_graphml)
from gradnet_cupy.edges.graph import (edge_statistics, edges_to_keep,
                                      per_class_samples, select_edges,
                                      summarize, unit_layers)
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import SPLITS
from gradnet_cupy.metric import (DEFAULT_MAX_BLOCK, DEFAULT_MAX_BYTES,
                                 DEFAULT_PARTITION, PARTITIONS)
from gradnet_cupy.metric.size import (flat_layout, format_bytes, metric_size,
                                      resnet50_layout)
from gradnet_cupy.models import MODELS, build_model
from gradnet_cupy.tangent import parameter_layout
from gradnet_cupy.files import atomic_write

SUMMARY_FILE = 'edges.json'
EXAMPLE_LAYOUTS = {'resnet50': resnet50_layout}


@click.command('edges')
@base_model_options
@dataset_options
@click.option('--split', type=click.Choice(SPLITS), default='test',
              show_default=True)
@click.option('--per-class', type=int, default=100, show_default=True,
              help='The first N samples of every class of the split.')
@click.option('--alpha', type=float, default=0.01, show_default=True,
              help='Keep ceil(alpha * |E_k|) edges of every layer k.')
@click.option('--target-label', type=int, default=None,
              help='Gradients of the loss of this label for every sample '
                   '(default: the true label).')
@click.option('--batch', type=int, default=64, show_default=True,
              help='Samples per tangent computation.')
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for edges.json, class_<c>.png, '
                   'class_<c>.graphml and overlay.png.')
@common_options
def edges(snapshot, arch, q, dataset, data_dir, subset, split, per_class,
          alpha, target_label, batch, out, device, seed, as_json):
    """The important edges of a base network per class (seed 000 Fig. 1).

    For every class, from the per-sample gradients of the true (or
    --target-label) label sparsified per layer at --q: how often each edge
    W[out, in] is kept and its mean |gradient|; the top ceil(alpha |E_k|)
    edges of every layer; drawings, GraphML and the numbers as JSON.
    Filters and channels are the units of a cnn (taps summed).
    """
    if arch not in ('mlp', 'cnn'):
        raise GradnetError(f'edges needs a chain network: --arch mlp or cnn, '
                           f'not {arch}')
    edges_to_keep(1, alpha)                       # checks alpha
    if batch < 1:
        raise GradnetError(f'--batch must be >= 1, got {batch}')
    data = load_dataset(dataset, data_dir, subset)
    model, layout = load_base_model(snapshot, arch, data, device)
    unit_layers(layout)
    x, y = getattr(data, split)
    rows = per_class_samples(y, data.n_classes, per_class)
    stats = edge_statistics(model, layout, x[rows], y[rows], data.n_classes,
                            q, target_label=target_label, device=device,
                            transform=data.eval_transform, batch=batch)
    selection = select_edges(stats, alpha)
    summary = summarize(stats, selection, alpha)
    gradient = ('true label' if target_label is None
                else f'target label {target_label}')
    summary.update(model=snapshot, arch=arch, dataset=dataset, split=split,
                   q=q, per_class=per_class, target_label=target_label,
                   subset=subset, out=out)
    os.makedirs(out, exist_ok=True)
    for c, chosen in enumerate(selection):
        draw_class(stats, chosen, c, data.in_shape,
                   os.path.join(out, f'class_{c}.png'),
                   f'class {c}: top {alpha:g} of edges per layer (q={q:g}, '
                   f'{gradient}, {stats.n_samples[c]} samples)')
        write_graphml(class_graph(stats, chosen, c, data.in_shape),
                      os.path.join(out, f'class_{c}.graphml'))
    draw_overlay(stats, selection, data.in_shape,
                 os.path.join(out, 'overlay.png'),
                 f'all classes: top {alpha:g} of edges per layer '
                 f'(q={q:g}, {gradient})')
    atomic_write(os.path.join(out, SUMMARY_FILE), lambda f: f.write(
        (json.dumps(summary, indent=1) + '\n').encode()))
    lines = [f"class {s['class']}: {s['first_layer_nodes']} first-layer "
             f"nodes, {s['paths_from_second_layer']} paths from "
             f"{s['second_layer_sources']} second-layer nodes"
             for s in summary['classes']]
    report(as_json, summary, '\n'.join(
        lines + [f'edges.json, class_<c>.png/.graphml, overlay.png in '
                 f'{out}']))


@click.command('metric-size')
@click.option('--arch', type=click.Choice(list(MODELS) +
                                          list(EXAMPLE_LAYOUTS)),
              default='cnn', show_default=True,
              help='A package model (built for --in-shape, --classes) or '
                   'resnet50: the ImageNet ResNet-50 weights (25.5M).')
@click.option('--params', type=int, default=None,
              help='Instead of --arch: one vector of this many parameters '
                   '(e.g. 25200000).')
@click.option('--in-shape', default='1,28,28', show_default=True,
              help='C,H,W of the input of a package model.')
@click.option('--classes', type=int, default=10, show_default=True)
@click.option('--partition', type=click.Choice(PARTITIONS),
              default=DEFAULT_PARTITION, show_default=True)
@click.option('--max-block', type=int, default=DEFAULT_MAX_BLOCK,
              show_default=True, help='Cut longer blocks (0: no cap).')
@click.option('--max-bytes', type=int, default=DEFAULT_MAX_BYTES,
              show_default=True,
              help="The device budget of BlockMetric's memory check.")
@common_options
def metric_size_command(arch, params, in_shape, classes, partition,
                        max_block, max_bytes, device, seed, as_json):
    """Bytes of the full, block-diagonal and diagonal metric of a model.

    Per layer and in total: the full metric (G float64, n^2 x 8 bytes, and
    G^-1/2 float32, n^2 x 4), the block-diagonal metric of --partition
    (sum size_b^2 entries at 12 bytes: what BlockMetric keeps on its
    device, counted by the function of its memory check) and the diagonal
    (n x 12 bytes).
    """
    if max_block < 0:
        raise GradnetError(f'--max-block must be >= 0, got {max_block}')
    if params is not None:
        if params < 1:
            raise GradnetError(f'--params must be >= 1, got {params}')
        layout, name = flat_layout(params), f'{params} parameters'
    elif arch in EXAMPLE_LAYOUTS:
        layout, name = EXAMPLE_LAYOUTS[arch](), arch
    else:
        shape = _parse_shape(in_shape)
        layout = parameter_layout(build_model(arch, shape, classes, seed))
        name = f"{arch} on {'x'.join(map(str, shape))}, {classes} classes"
    summary = dict(metric_size(layout, partition, max_block, max_bytes),
                   model=name)
    report(as_json, summary, _size_table(summary))


def _parse_shape(text):
    try:
        return tuple(int(s) for s in text.split(','))
    except ValueError:
        raise GradnetError(f'--in-shape {text!r} is not C,H,W') from None


def _size_table(summary):
    total = summary['total']
    columns = ('layer', 'params', 'full n_l^2', 'block-diagonal',
               'diagonal')
    rows = [(la['layer'], f"{la['params']:,}", format_bytes(la['full_bytes']),
             format_bytes(la['block_bytes']),
             format_bytes(la['diagonal_bytes']))
            for la in summary['layers']]
    rows.append(('total', f"{total['params']:,}",
                 format_bytes(total['full_bytes']),
                 format_bytes(total['block_bytes']),
                 format_bytes(total['diagonal_bytes'])))
    widths = [max(len(r[i]) for r in rows + [columns])
              for i in range(len(columns))]
    lines = ['  '.join(v.rjust(w) if i else v.ljust(w)
                       for i, (v, w) in enumerate(zip(r, widths)))
             for r in [columns] + rows]
    cap = summary['max_block'] or 'none'
    lines += [
        f"{summary['model']}: full metric G {format_bytes(total['full_g_bytes'])}"
        f" (n^2 x 8) + G^-1/2 {format_bytes(total['full_inverse_sqrt_bytes'])}"
        f" (n^2 x 4), n = {total['params']:,}",
        f"{summary['partition']} blocks (max block {cap}): {total['blocks']:,}"
        f" blocks up to {total['largest_block']}, "
        f"{format_bytes(total['block_bytes'])} on the device; "
        + ('fits' if summary['fits'] else 'does not fit')
        + f" max_bytes {format_bytes(summary['max_bytes'])}"]
    return '\n'.join(lines)


COMMANDS = [edges, metric_size_command]
