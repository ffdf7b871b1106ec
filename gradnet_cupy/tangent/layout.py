"""Which parameters a tangent feature row holds, and where (docs/method.rst#tangent-features).

Job: select the parameters of a Chainer model whose per-sample gradients
form the features, and describe the columns of a feature row: a
:class:`ParameterLayout` of :class:`ParameterEntry` rows (link path,
parameter name, shape, offset, size, link type), one block per link, blocks
in the model's definition order. The layout is the one object that says
what a column is, from extraction (:mod:`gradnet_cupy.tangent.engine`) to
the metric and GradNet; it is JSON-able through ``to_dict``/``from_dict``.

Neighbours: :mod:`gradnet_cupy.tangent.rules` says which parameters a link
type's rule computes (their names and block order);
:mod:`gradnet_cupy.tangent.engine` resolves a layout on a model and fills
its columns.
"""
from collections import Counter
from typing import NamedTuple, Tuple

import numpy as np

from gradnet_cupy.chainer_compat import chainer, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.tangent.rules import rule_for


class ParameterEntry(NamedTuple):
    """One selected parameter: ``features[:, offset:offset + size]`` is its
    per-sample gradient, flattened in C order from ``shape``."""
    path: str          # link path, e.g. '/conv1' ('/' for the model itself)
    name: str          # parameter name within the link, e.g. 'W'
    shape: Tuple[int, ...]
    offset: int
    size: int
    link_type: str     # class name of the link, e.g. 'Convolution2D'


class ParameterLayout(NamedTuple):
    """The selected parameters in feature order.

    One block per link (its W, then its bias when selected; gamma then beta
    for BatchNormalization), blocks in the model's definition order.
    """
    entries: Tuple[ParameterEntry, ...]

    @property
    def n_params(self):
        """Length of a feature row (int)."""
        return sum(e.size for e in self.entries)

    @property
    def block_paths(self):
        """Link path of each block, in feature order (tuple of str)."""
        paths = []
        for e in self.entries:
            if not paths or paths[-1] != e.path:
                paths.append(e.path)
        return tuple(paths)

    @property
    def block_sizes(self):
        """Length of each block (tuple of int, sums to ``n_params``): the
        ``sizes`` of the per-layer sparsification and GradNet's blocks."""
        sizes = Counter()
        for e in self.entries:
            sizes[e.path] += e.size
        return tuple(sizes[p] for p in self.block_paths)

    def to_dict(self):
        """A JSON-able dict; :meth:`from_dict` inverts it."""
        return {'entries': [
            {'path': e.path, 'name': e.name, 'shape': list(e.shape),
             'offset': e.offset, 'size': e.size, 'link_type': e.link_type}
            for e in self.entries]}

    @classmethod
    def from_dict(cls, d):
        """Rebuild a layout from :meth:`to_dict` output, checking that it is
        consistent (contiguous offsets, sizes matching shapes, one block per
        link)."""
        try:
            entries = tuple(
                ParameterEntry(str(e['path']), str(e['name']),
                               tuple(int(s) for s in e['shape']),
                               int(e['offset']), int(e['size']),
                               str(e['link_type']))
                for e in d['entries'])
        except (KeyError, TypeError, ValueError) as exc:
            raise GradnetError(f'malformed parameter layout: {exc!r}')
        return _checked_layout(entries)


def _checked_layout(entries):
    offset = 0
    for e in entries:
        if e.offset != offset or e.size != int(np.prod(e.shape, dtype=np.int64)):
            raise GradnetError(
                f'parameter layout entry {e.path}/{e.name}: offset {e.offset}'
                f' size {e.size} shape {e.shape} is inconsistent (expected '
                f'offset {offset}, size = product of shape)')
        offset += e.size
    layout = ParameterLayout(entries)
    if len(layout.block_paths) != len(set(e.path for e in entries)):
        raise GradnetError(
            'parameter layout: the entries of one link are not adjacent')
    return layout


def _named_links(model):
    """(path, link) pairs in definition order (Chain: attribute assignment
    order; ChainList: index order), each link once."""
    out, seen = [], set()

    def walk(prefix, link):
        if id(link) in seen:
            return
        seen.add(id(link))
        out.append((prefix or '/', link))
        if isinstance(link, chainer.ChainList):
            children = [(str(i), c) for i, c in enumerate(link)]
        elif isinstance(link, chainer.Chain):
            children = [(k, v) for k, v in link.__dict__.items()
                        if k in link._children]
        else:
            children = []
        for name, child in children:
            walk(f'{prefix}/{name}', child)

    walk('', model)
    return out


def _own_params(link):
    """{name: Parameter} of the link's own (not its children's) parameters."""
    return {name: getattr(link, name) for name in sorted(link._params)}


def _selected_names(link, include_bias):
    """Parameter names of ``link`` that a layout selects, W first."""
    params = _own_params(link)
    rule = rule_for(link)
    if rule is not None:
        names = [n for n in rule.params if n in params]
        if not include_bias:
            names = [n for n in names if n != 'b']
        return names
    return [n for n in params if include_bias or n != 'b']


def parameter_layout(model, *, include_bias=False, include_batchnorm=False,
                     include_deconvolution=False, include_embed_id=False,
                     links=None):
    """Select the parameters whose per-sample gradients form the features.

    Default (the paper's choice): ``W`` of every ``Linear`` and
    ``Convolution2D`` link. ``include_bias`` adds each selected link's ``b``;
    ``include_batchnorm`` adds BatchNormalization ``gamma``/``beta``;
    ``include_deconvolution`` / ``include_embed_id`` add the ``W`` of
    ``Deconvolution2D`` / ``EmbedID`` links.

    ``links``: an explicit list of link paths (as in ``model.namedlinks()``,
    e.g. ``['/conv2', '/fc']``) replacing the type selection; each named link
    contributes its weights (W; gamma/beta for BatchNormalization; for a link
    type without a batched rule all its own parameters) plus ``b`` when
    ``include_bias``. Such rule-less links are computed by the per-sample
    fallback (see :mod:`gradnet_cupy.tangent.engine`).

    Blocks follow the model's definition order. All selected parameters must
    be initialized. Returns a :class:`ParameterLayout`; raises GradnetError
    for an unknown path, a link without parameters of its own, an
    uninitialized parameter, or an empty selection.
    """
    named = _named_links(model)
    if links is None:
        kinds = [L.Linear, L.Convolution2D]
        if include_batchnorm:
            kinds.append(L.BatchNormalization)
        if include_deconvolution:
            kinds.append(L.Deconvolution2D)
        if include_embed_id:
            kinds.append(L.EmbedID)
        chosen = [(p, link) for p, link in named if type(link) in kinds]
    else:
        if isinstance(links, str):
            links = [links]
        by_path = dict(named)
        chosen = []
        for path in links:
            if path not in by_path:
                raise GradnetError(
                    f'link path {path!r} is not in the model; its links are: '
                    + ', '.join(p for p, _ in named))
            if not _own_params(by_path[path]):
                raise GradnetError(
                    f'link {path!r} ({type(by_path[path]).__name__}) has no '
                    'parameters of its own; name the links inside it')
            chosen.append((path, by_path[path]))
        order = {p: i for i, (p, _) in enumerate(named)}
        chosen = sorted(set(chosen), key=lambda pl: order[pl[0]])
    entries, offset = [], 0
    for path, link in chosen:
        params = _own_params(link)
        for name in _selected_names(link, include_bias):
            param = params[name]
            if param.array is None:
                raise GradnetError(
                    f'parameter {path}/{name} is not initialized; run one '
                    'forward pass of the model first')
            shape = tuple(int(s) for s in param.shape)
            size = int(np.prod(shape, dtype=np.int64))
            entries.append(ParameterEntry(path, name, shape, offset, size,
                                          type(link).__name__))
            offset += size
    if not entries:
        raise GradnetError('the parameter selection is empty: the model has '
                           'no Linear/Convolution2D link (or none selected)')
    return ParameterLayout(tuple(entries))

