"""The extraction stage: images -> tangent features -> per-layer sparse CSR.

the data flow of docs/method.rst#data-flow-and-devices, model + batch -> tangent -> kernels (sparsify) -> CSR
batch, for one split of a dataset. :func:`iter_sparse_tangents` yields the
CSR batches (used by the online trainer, which skips the store);
:func:`extract_to_store` streams them into a resumable
:class:`~gradnet_cupy.store.TangentStore`.

Rows are produced in a fixed order (sample-major, samples in split order,
for ``all`` candidates ``0 .. C-1`` per sample), and ``random`` candidates
are drawn once for the whole split from ``seed``, so a shard or a resumed run
produces exactly the rows of an uninterrupted one. Everything that decides
the bits besides the package version (model checksum, q, candidates, seed,
``batch``, the engine's ``sub_batch``, the device) is in the store's
provenance, so a resume or a merge that could not reproduce them is refused
with the key that differs.
"""
import numpy as np
from tqdm import tqdm

from gradnet_cupy.backend import get_array_module, to_device
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import percentile_sparsify
from gradnet_cupy.kernels.sparsify import check_q
from gradnet_cupy.kernels.csr import vstack
from gradnet_cupy.metric import save_store_metric
from gradnet_cupy.store import (DEFAULT_COMPRESSION, StoreWriter, TangentStore,
                                file_sha256)
from gradnet_cupy.tangent import (
    CANDIDATE_MODES, CROSS_ENTROPY, ChainerSource, TangentSource)
from gradnet_cupy.tangent.engine import SUB_BATCH

FRAMEWORKS = ('chainer', 'torch')
METRIC_READ_BATCH = 256    # rows per read when a resumed run replays a store
SPLITS = ('gradnet', 'test', 'base')


def parse_shard(text):
    """``'i/n'`` (0 <= i < n) -> ``(i, n)``; None -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split('/'))
    except ValueError:
        raise GradnetError(f"--shard {text!r} is not of the form i/n") \
            from None
    if not 0 <= index < count:
        raise GradnetError(f'--shard {text}: need 0 <= i < n')
    return index, count


def shard_range(n_samples, shard, batch):
    """The ``(start, stop)`` samples of shard ``(i, n)``: disjoint,
    contiguous slices covering ``range(n_samples)``, cut at multiples of
    ``batch`` so that every shard computes the same sample batches as an
    unsharded run (and so the same bits)."""
    index, count = shard
    n_batches = -(-n_samples // batch)
    bounds = np.linspace(0, n_batches, count + 1).astype(np.int64) * batch
    return (min(int(bounds[index]), n_samples),
            min(int(bounds[index + 1]), n_samples))


def candidate_plan(mode, labels, n_classes, seed):
    """Per-sample candidate labels (int32, (N,)) for ``random`` or ``true``;
    None for ``all`` (every class, handled by the tangent stage)."""
    if mode == 'all':
        return None
    if mode == 'true':
        return np.asarray(labels, dtype=np.int32)
    if mode == 'random':
        rng = np.random.default_rng(seed)
        return rng.integers(0, n_classes, size=len(labels)).astype(np.int32)
    raise GradnetError(f"unknown candidate mode {mode!r}: choose one of "
                       f"{', '.join(CANDIDATE_MODES)}")


def as_source(model, layout, objective=CROSS_ENTROPY):
    """``model`` as a :class:`~gradnet_cupy.tangent.TangentSource`: a source
    is returned as it is (its own layout and objective, by name, must be
    ``layout`` and ``objective``), a Chainer model is wrapped in a
    :class:`~gradnet_cupy.tangent.ChainerSource` of ``layout`` and
    ``objective``."""
    if not isinstance(model, TangentSource):
        return ChainerSource(model, layout, objective)
    if model.layout != layout or model.objective.name != objective.name:
        raise GradnetError(
            f'the {model.framework} source has its own layout and objective '
            f'({model.objective.name}); pass source.layout and '
            'source.objective with it')
    return model


def iter_sparse_tangents(model, x, labels, candidates, q, layout, device,
                         transform, batch=64, start=0, stop=None,
                         objective=CROSS_ENTROPY, features_map=None):
    """Sparse tangent features of samples ``start .. stop`` of ``x``.

    Args:
        model: the base network (Chainer, float32) on ``device``, or a
            :class:`~gradnet_cupy.tangent.TangentSource` on ``device``
            (e.g. a :class:`~gradnet_cupy.tangent.TorchSource`) with this
            ``layout`` and ``objective``.
        x: (N, C, H, W) float32 host images; labels: (N,) int32.
        candidates: per-sample int32 labels (N,) or None for all classes
            (see :func:`candidate_plan`).
        q: the sparsification percentile; layout: the ParameterLayout whose
            ``block_sizes`` are the per-layer segments.
        device: 'cpu' or 'gpu'; transform: ``transform(x) -> x`` applied to
            each host batch (the dataset's eval transform).
        batch: samples per tangent computation.
        objective: the tangent :class:`~gradnet_cupy.tangent.Objective`
            (an unsupervised one: one row per sample, ``candidates``
            ignored, candidate -1).
        features_map: ``rows -> rows`` applied to each dense feature chunk
            (rows x n_params) before sparsification (e.g. an RBM's Fisher
            centring), or None.

    Yields, per batch of samples, ``(csr, sample, candidate, target)`` on
    ``device``: a CSR of float32 features (rows x n_params), int64 sample
    indices into ``x``, and the int32 candidate and true label of each row.
    A batch's rows depend only on its samples, so a run started at a batch
    boundary reproduces the bits of one started earlier.
    """
    stop = len(x) if stop is None else stop
    source = as_source(model, layout, objective)
    for first in range(start, stop, batch):
        last = min(first + batch, stop)
        xb = to_device(transform(x[first:last]), device)
        yb = to_device(labels[first:last], device)
        cb = 'all' if candidates is None else to_device(
            candidates[first:last], device)
        chunks = [(percentile_sparsify(
            c.features if features_map is None else features_map(c.features),
            layout.block_sizes, q), c.sample, c.candidate, c.target)
            for c in source.iter_rows(xb, yb, cb)]
        csrs, samples, candidates_, targets = zip(*chunks)
        xp = get_array_module(samples[0])
        yield (vstack(csrs, layout.n_params, xp),
               xp.concatenate(samples) + first,
               xp.concatenate(candidates_), xp.concatenate(targets))


def extract_to_store(model, layout, split_data, n_classes, out, provenance,
                     candidates='random', q=85.0, shard=(0, 1), seed=0,
                     device='cpu', transform=None, batch=64, progress=True,
                     compression=DEFAULT_COMPRESSION, metric=None,
                     objective=CROSS_ENTROPY, features_map=None):
    """Extract one split into the store ``out``; resumes a killed run.

    ``model``, ``layout``, ``objective``: as in :func:`iter_sparse_tangents`
    (a Chainer model or a tangent source with its layout and objective).
    ``split_data``: ``(x, y)`` host arrays of the split. ``provenance``: what
    identifies this extraction beside the arguments here (dataset, split,
    model checksum, ...); a store at ``out`` from a different extraction is
    refused, as is one whose ``batch``, sub-batch or ``device`` differ
    (they decide the bits). ``compression``: the store's, one of
    :data:`gradnet_cupy.store.COMPRESSIONS` (default blosc2-zstd).
    ``metric``: an empty :class:`~gradnet_cupy.metric.BlockMetric` on
    ``device`` (the ``extraction_accumulator`` of
    :class:`~gradnet_cupy.normalize.MetricNormalizer`) that
    accumulates every row of the store as its batches are extracted (a
    resumed run first reads back the rows committed before), saved to
    :func:`~gradnet_cupy.metric.store_metric_path` once the store is final.
    ``objective``, ``features_map``: as in :func:`iter_sparse_tangents`;
    an unsupervised objective writes one row per sample (candidate -1,
    provenance ``candidates: 'none'``); another objective than the default
    is recorded as provenance ``objective``.
    Returns a summary dict (rows, nnz, path, ..., ``metric``: its path).
    """
    check_q(q)
    if int(batch) != batch or batch < 1:
        raise GradnetError(f'batch must be a positive integer, not {batch!r}')
    x, y = split_data
    start, stop = shard_range(len(x), shard, batch)
    if start == stop:
        raise GradnetError(
            f'{out}: shard {shard[0]}/{shard[1]} of {len(x)} samples in '
            f'batches of {batch} holds no samples: use fewer shards or a '
            'smaller --batch')
    if not objective.uses_candidates:
        candidates = 'none'
    rows_per_sample = n_classes if candidates == 'all' else 1
    plan = None if candidates == 'none' else \
        candidate_plan(candidates, y, n_classes, seed)
    provenance = dict(provenance, q=float(q), n_classes=int(n_classes),
                      candidates=candidates, seed=int(seed),
                      shard=list(shard), batch=int(batch),
                      sub_batch=SUB_BATCH, device=device)
    if objective is not CROSS_ENTROPY:    # CE stores keep their provenance
        provenance['objective'] = objective.name
    writer = StoreWriter.create_or_resume(
        out, layout.n_params, layout.to_dict(), provenance,
        total_rows=(stop - start) * rows_per_sample, compression=compression)
    done_rows = writer.n_rows
    if done_rows % rows_per_sample:
        raise GradnetError(f'{out}: {done_rows} committed rows are not whole '
                           f'samples of {rows_per_sample} rows')
    resume_at = start + done_rows // rows_per_sample
    bar = tqdm(total=(stop - start) * rows_per_sample, initial=done_rows,
               unit='rows', disable=None if progress else True,
               desc='extract')
    with writer:
        if metric is not None and done_rows:
            with TangentStore.open(out, allow_incomplete=True) as committed:
                for b in committed.iter_batches(METRIC_READ_BATCH):
                    metric.accumulate(b.csr.to_device(device))
        for csr, sample, candidate, target in iter_sparse_tangents(
                model, x, y, plan, q, layout, device,
                transform or (lambda v: v), batch, resume_at, stop,
                objective, features_map):
            writer.append(csr, sample, candidate, target)
            if metric is not None:
                metric.accumulate(csr)
            bar.update(csr.shape[0])
        bar.close()
        writer.finalize()
    with TangentStore.open(out) as store:
        summary = {
            'path': str(out), 'rows': len(store), 'nnz': store.nnz,
            'n_columns': store.n_columns, 'resumed_from_rows': done_rows,
            'density': store.nnz / max(1, len(store) * store.n_columns)}
        if metric is not None:
            summary['metric'] = str(save_store_metric(metric, store))
    return summary


def model_provenance(snapshot_path, arch, dataset, split, data_dir=None,
                     subset=None):
    """The provenance keys of an extraction from a snapshot file."""
    return {'model_snapshot': str(snapshot_path),
            'model_sha256': file_sha256(snapshot_path), 'arch': arch,
            'dataset': dataset, 'data_dir': data_dir, 'split': split,
            'subset': subset}


def torch_extraction(factory, weights, device, dataset, split, data_dir=None,
                     subset=None):
    """``(source, provenance)`` of ``extract --framework torch``: a
    :class:`~gradnet_cupy.tangent.TorchSource` of the module of ``factory``
    (``'path/model.py:name'``) with the state dict ``weights`` on
    ``device``, and the provenance keys of :func:`model_provenance` (the
    weights as the snapshot, ``arch`` ``'torch:<name>'``) plus the factory
    file's checksum and the torch version (they decide the bits too)."""
    from gradnet_cupy.tangent.torch_source import (
        TorchSource, import_torch, load_module)
    source = TorchSource(load_module(factory, weights, device))
    path, _, name = factory.rpartition(':')
    provenance = dict(
        model_provenance(weights, f'torch:{name}', dataset, split, data_dir,
                         subset),
        model_factory=factory, model_factory_sha256=file_sha256(path),
        torch_version=import_torch().__version__)
    return source, provenance
