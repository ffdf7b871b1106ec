"""``fit --mpi``: data-parallel GradNet training over the ranks.

Every rank holds the whole model (gradients averaged by ChainerMN's
multi-node optimizer, :meth:`.parallel.Parallel.optimizer`) and reads only
its slice of each global batch: the store is shuffled per epoch exactly as
:meth:`gradnet_cupy.store.TangentStore.iter_batches` shuffles it for one
process (``default_rng(seed + epoch)``, same seed on every rank), cut into
global batches of ``size x batch`` rows, and rank ``r`` takes the ``r``-th
of ``size`` near-equal slices of each (``numpy.array_split``). Its rows
carry the loss weight ``size / rows of the global batch``, so that the mean
of the ranks' gradients is the gradient of the global batch's mean loss,
also for a last batch that does not split evenly (a rank whose slice is
empty computes one row with weight 0). N ranks with ``batch`` b thus train
as one process with ``batch`` N·b, up to float rounding.

The test store is split between the ranks by whole samples (contiguous
runs of each sample's candidate rows) and the counts of correct samples
are summed.

Neighbours: :mod:`.parallel`, :mod:`gradnet_cupy.gradnet` (the loop and
the all-candidates rule it feeds), :mod:`gradnet_cupy.store` (reads).
"""
import numpy as np

from gradnet_cupy.backend import to_device
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet.training import evaluate_candidates
from gradnet_cupy.gradnet.persist import load_state_arrays, state_arrays

EVAL_BATCH = 100     # test samples per batch (as gradnet.store_test_batches)


def rank_rows(n_rows, batch, seed, parallel):
    """This rank's share of each global batch of one epoch: yields
    ``(rows, weight)``, int64 store rows (>= 1) and float32 per-row loss
    weights, from the permutation ``default_rng(seed)`` of ``n_rows``."""
    order = np.random.default_rng(seed).permutation(n_rows)
    size = parallel.size
    for start in range(0, n_rows, batch * size):
        rows = order[start:start + batch * size]
        mine = np.array_split(rows, size)[parallel.rank]
        weight = np.float32(size / len(rows))
        if not len(mine):
            mine, weight = rows[:1], np.float32(0)
        yield mine, np.full(len(mine), weight, dtype=np.float32)


def rank_batches(store, normalizer, batch, seed, device, parallel):
    """``epoch -> iterator of (normalized csr, target, weight)``: this
    rank's slices (:func:`rank_rows`) of the global batches of ``parallel.
    size x batch`` rows of the training store, shuffled from ``seed +
    epoch``; float32 CSR, int32 labels and float32 weights (rows,) on
    ``device``."""
    def epoch_batches(epoch):
        for rows, weight in rank_rows(len(store), batch, seed + epoch,
                                      parallel):
            b = store.read_rows(rows)
            yield (normalizer(b.csr.to_device(device)),
                   to_device(b.target.astype(np.int32), device),
                   to_device(weight, device))
    return epoch_batches


def sample_runs(store):
    """Row offsets (int64, (samples + 1,)) of the samples of a store whose
    rows come sample by sample (an extraction's order); GradnetError if a
    sample's rows are not contiguous."""
    sample = store.sample
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    if len(starts) != len(np.unique(sample)):
        raise GradnetError(f'{store.path}: the rows of a sample are not '
                           'contiguous; --mpi evaluates extraction stores')
    return np.r_[starts, len(sample)].astype(np.int64)


def rank_evaluator(model, test_store, normalizer, device, parallel):
    """``() -> accuracy`` of ``model`` on a test store, each rank scoring
    its near-equal share of the samples (batches of :data:`EVAL_BATCH`)
    and the counts summed over the ranks."""
    runs = sample_runs(test_store)
    mine = np.array_split(np.arange(len(runs) - 1), parallel.size)[
        parallel.rank]

    def batches():
        for first in range(0, len(mine), EVAL_BATCH):
            chosen = mine[first:first + EVAL_BATCH]
            b = test_store.read(int(runs[chosen[0]]),
                                int(runs[chosen[-1] + 1]))
            yield b.csr.to_device(device), b.sample, b.target

    def evaluate_test():
        correct = 0
        if len(mine):
            _, _, predicted, truth = evaluate_candidates(model, batches(),
                                                         normalizer)
            correct = int(np.sum(predicted == truth))
        counts = parallel.allgather((correct, len(mine)))
        return sum(c for c, _ in counts) / sum(n for _, n in counts)
    return evaluate_test


def share_state(parallel, model, optimizer):
    """Rank 0's weights and optimizer state (e.g. resumed from its
    checkpoint) copied to every rank."""
    arrays = parallel.bcast(state_arrays(model, optimizer)
                            if parallel.is_root else None)
    if not parallel.is_root:
        load_state_arrays(arrays, model, optimizer)
