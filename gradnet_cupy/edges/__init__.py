"""The important-edges graph of a base network (issue #17; seed 000 Fig. 1).

Modules, one job each:

- :mod:`.graph`  units and edges of a chain network, per-class edge
  statistics from the sparsified per-sample gradients
  (:func:`edge_statistics`), the top edges per layer (:func:`select_edges`)
  and their numbers (:func:`summarize`);
- :mod:`.draw`   the layered PNG drawings and the GraphML files;
- :mod:`.cli`    the ``edges`` and ``metric-size`` commands (registered in
  :mod:`gradnet_cupy.cli`).
"""
from gradnet_cupy.edges.graph import (
    EdgeStats, UnitLayer, edge_statistics, edges_to_keep, per_class_samples,
    select_edges, summarize, unit_layers)

__all__ = ['EdgeStats', 'UnitLayer', 'edge_statistics', 'edges_to_keep',
           'per_class_samples', 'select_edges', 'summarize', 'unit_layers']
