"""The extraction engine: a model and a batch -> rows of tangent features
(docs/method.rst#tangent-features).

Job: run the model, find each selected link's output gradients, hand them
to the per-layer rules, and cut the work into chunks, threads and the
per-sample fallback loop. Public: :func:`tangent_features`,
:func:`iter_tangent_features`, :func:`logit_jacobian`,
:func:`iter_logit_jacobian`, :class:`TangentBatch`,
:class:`TangentFallbackWarning`, ``CANDIDATE_MODES``, ``MAX_BYTES``,
``SUB_BATCH``, and the per-sample objectives: :class:`Objective`,
:class:`CrossEntropy` (:data:`CROSS_ENTROPY`, the default), :class:`OutputSum`
(unsupervised).

Neighbours: :mod:`gradnet_cupy.tangent.layout` says which parameters fill
which columns; :mod:`gradnet_cupy.tangent.rules` turns a link's recorded
call and output gradients into per-sample parameter gradients.

How it works (no per-sample loop for links with a rule)
-------------------------------------------------------
One forward pass records, through a Chainer ``LinkHook``, the input and the
output variable of every call of a selected link. Backward passes
(``chainer.grad``, which prunes the graph, so no parameter gradient is
computed) then give each link's output gradient ``gy`` for a chosen gradient
``g`` of the logits; because the loss is a sum of per-sample losses and
samples do not interact, ``gy[i]`` is exactly sample ``i``'s output gradient.
The rules (:mod:`~gradnet_cupy.tangent.rules`) turn ``(input, gy)`` into
per-sample parameter gradients.

The objective (an :class:`Objective`) gives the seeds: the per-row
output gradients, one array per backward pass. An unsupervised objective
(e.g. ``OutputSum('free-energy')``, the seed ones for a model returning one
scalar per sample) needs one pass and gives one row per sample with
candidate -1. The gradient of CE for candidate ``c`` w.r.t. the logits is
``g = softmax(z) - e_c``, so one forward serves every candidate: modes
``'true'``/``'random'``/explicit need one backward pass (each row its own
``g``), ``'all'`` needs C backward passes, pass ``c`` seeded with
``softmax(z) - e_c``. That is the cheapest exact choice: the C output
gradients per sample are C different vectors, so C passes are needed anyway,
and seeding with ``softmax(z) - e_c`` directly avoids combining Jacobian rows
afterwards. The logit Jacobian uses the same machinery seeded with ``e_k``.
The output gradients of all passes are stacked, (n, passes, ...), and each
rule runs once over them (im2col of a convolution input is done once).

Chunks: :func:`iter_tangent_features` yields chunks of whole samples, sized
so that a chunk's features plus its main working arrays (output gradients
of every backward pass, recorded inputs, the rules' work arrays such as
im2col columns) stay within ``max_bytes`` (at least one sample per chunk;
Chainer's own temporaries come on top). Chunks hold the same rows and
metadata as one big chunk; the values agree to rounding (Chainer's forward
pass itself is not bit-identical across batch sizes: BLAS blocking).
Threads (CPU only): each chunk is cut into fixed sub-batches of
``SUB_BATCH`` samples, computed with single-threaded BLAS; ``n_threads``
threads only schedule them, so the bits do not depend on the number of
threads or CPUs (only on the chunk, ``SUB_BATCH`` and the BLAS build).

Fallback: links without a rule, and rule links used in a way the rules do
not cover (batch axis not first, a parameter also used outside the link's
own call, a channel-last convolution, BatchNormalization not normalizing
over axis 0), are computed by a per-sample autograd loop (one forward per
sample, one ``chainer.grad`` per row) with a :class:`TangentFallbackWarning`
naming the link; ``strict=True`` raises :class:`GradnetError` instead. The
check counts, in the recorded graph, the function nodes using each selected
parameter and compares with the recorded link calls, so a weight used
elsewhere is noticed. Only links of exactly a rule's class are batched (a
subclass may override ``forward``).
"""
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from threadpoolctl import ThreadpoolController

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.tangent.layout import (
    _named_links, _own_params, parameter_layout)
from gradnet_cupy.tangent.rules import Call, rule_for
from gradnet_cupy.tangent.source import (
    CANDIDATE_MODES, MAX_BYTES, TangentBatch, int_labels, plan_rows,
    row_labels, samples_per_chunk)

SUB_BATCH = 16
"""Samples per CPU sub-batch: the unit of work that threads schedule (a
fixed function of the chunk, never of the thread count, so the features are
bit-identical for any ``n_threads``)."""


class TangentFallbackWarning(UserWarning):
    """A link's per-sample gradients come from the slow per-sample loop."""


# --------------------------------------------------------------------------
# Forward recording and the per-chunk engine
# --------------------------------------------------------------------------

class _Recorder(chainer.LinkHook):
    """Records every forward call of the given links."""
    name = 'gradnet_cupy_tangent_recorder'

    def __init__(self, links):
        self.calls = {id(link): [] for link in links}

    def forward_postprocess(self, args):
        calls = self.calls.get(id(args.link))
        if calls is None or args.forward_name != 'forward' or not args.args:
            return
        x = args.args[0]
        x = x.array if isinstance(x, chainer.Variable) else x
        calls.append(Call(x, tuple(args.args[1:]), dict(args.kwargs),
                          args.out))


class _Slot(NamedTuple):
    """One link of the layout: its entries and their Parameters."""
    path: str
    link: object
    entries: tuple
    params: tuple


def _slots(model, layout):
    """Resolve ``layout`` on ``model`` into per-link slots, checking shapes."""
    by_path = dict(_named_links(model))
    slots = []
    for path in layout.block_paths:
        link = by_path.get(path)
        if link is None:
            raise GradnetError(f'layout link {path!r} is not in the model')
        entries = tuple(e for e in layout.entries if e.path == path)
        own = _own_params(link)
        params = []
        for e in entries:
            p = own.get(e.name)
            if p is None or p.array is None or tuple(p.shape) != e.shape:
                have = None if p is None or p.array is None else tuple(p.shape)
                raise GradnetError(
                    f'layout parameter {path}/{e.name} with shape {e.shape} '
                    f'does not match the model (model has {have})')
            params.append(p)
        slots.append(_Slot(path, link, entries, tuple(params)))
    return slots


def _param_uses(z, params):
    """How many function nodes of z's graph take each parameter as input:
    {id(param): count}."""
    wanted = {id(p.node): id(p) for p in params}
    counts = Counter()
    seen = set()
    stack = [z.creator_node] if z.creator_node is not None else []
    while stack:
        func = stack.pop()
        if id(func) in seen:
            continue
        seen.add(id(func))
        for node in func.inputs:
            key = wanted.get(id(node))
            if key is not None:
                counts[key] += 1
            if node.creator_node is not None:
                stack.append(node.creator_node)
    return counts


def _softmax(z):
    xp = get_array_module(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _one_hot(xp, labels, n_classes, dtype):
    out = xp.zeros((len(labels), n_classes), dtype=dtype)
    out[xp.arange(len(labels)), labels] = 1
    return out


class _Extraction:
    """One extraction call: the model, its resolved layout slots, the
    options, and the per-chunk work (forward, backward passes, rules,
    fallback, weight decay)."""

    def __init__(self, model, layout, objective, strict, weight_decay):
        self.model = model
        self.objective = objective
        self.layout = layout
        self.slots = _slots(model, layout)
        self.strict = strict
        self.weight_decay = float(weight_decay)
        self.dtype = np.result_type(
            *[p.dtype for s in self.slots for p in s.params])
        self.warned = set()

    def forward(self, x):
        """Forward pass in inference mode recording the selected links.
        Returns (output Variable, {path: [calls]}); the objective checks
        the output's shape."""
        recorder = _Recorder([s.link for s in self.slots])
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', True), recorder:
            z = self.model(x)
        self.objective.check_output(z, x)
        calls = {s.path: recorder.calls[id(s.link)] for s in self.slots}
        return z, calls

    def _fallback_reason(self, slot, calls, uses, n):
        rule = rule_for(slot.link)
        if rule is None:
            return 'has no batched per-sample rule'
        for call in calls:
            reason = rule.unsupported(slot.link, call, n)
            if reason:
                return reason
        for p in slot.params:
            if uses[id(p)] != len(calls):
                return (f'has a parameter used {uses[id(p)]} times in the '
                        f'graph but the link was called {len(calls)} times')
        return None

    def _split(self, z, calls, n):
        """Slots computed by rules and slots needing the fallback loop."""
        uses = _param_uses(z, [p for s in self.slots for p in s.params])
        batched, fallback = [], []
        for slot in self.slots:
            reason = self._fallback_reason(slot, calls[slot.path], uses, n)
            if reason is None:
                batched.append(slot)
                continue
            message = (f"link {slot.path!r} ({type(slot.link).__name__}) "
                       f"{reason}")
            if self.strict:
                raise GradnetError(
                    message + '; strict=True forbids the per-sample fallback')
            if slot.path not in self.warned:
                self.warned.add(slot.path)
                warnings.warn(
                    message + '; its per-sample gradients come from a slow '
                    'per-sample autograd loop', TangentFallbackWarning,
                    stacklevel=4)
            fallback.append(slot)
        return batched, fallback

    def _dests(self, out, n_passes, slot):
        """{name: view (n, n_passes) + shape} of the slot's columns."""
        rows = out.reshape(out.shape[0] // n_passes, n_passes, -1)
        return {e.name: rows[:, :, e.offset:e.offset + e.size].reshape(
            rows.shape[:2] + e.shape) for e in slot.entries}

    def run_chunk(self, x, z, calls, seeds, out):
        """Fill ``out`` (n * n_passes, n_params) for the chunk ``x``.

        ``z``, ``calls``: its recorded forward; ``seeds``: list of output
        gradients (n, ...) shaped like ``z``, one per backward pass; row ``i * n_passes + r`` is
        sample ``i`` under ``seeds[r]``.
        """
        n = len(x)
        n_passes = len(seeds)
        batched, fallback = self._split(z, calls, n)
        recorded = [(slot, call) for slot in batched
                    for call in calls[slot.path]]
        xp = get_array_module(out)
        gys = [xp.empty((n, n_passes) + call.out.shape[1:], z.dtype)
               for _, call in recorded]
        for r, seed in enumerate(seeds):
            if not recorded:
                break
            grads = chainer.grad([z], [call.out for _, call in recorded],
                                 grad_outputs=[chainer.Variable(seed)])
            for gy, g in zip(gys, grads):   # None: output does not reach z
                gy[:, r] = 0 if g is None else g.array
        written = set()
        for (slot, call), gy in zip(recorded, gys):
            rule = rule_for(slot.link)
            rule.write(slot.link, call, rule.prepare(slot.link, call), gy,
                       self._dests(out, n_passes, slot),
                       accumulate=slot.path in written)
            written.add(slot.path)
        for slot in batched:
            if slot.path not in written:   # never called: gradient 0
                for d in self._dests(out, n_passes, slot).values():
                    d[...] = 0
        if fallback:
            self._fallback(x, seeds, fallback, out)
        if self.weight_decay:
            for slot in self.slots:
                for e, p in zip(slot.entries, slot.params):
                    out[:, e.offset:e.offset + e.size] += \
                        self.weight_decay * p.array.reshape(-1)

    def sample_bytes(self, calls, n_passes):
        """Estimated bytes per sample of a chunk: its feature rows, the
        output gradients of every pass, the recorded inputs and the rules'
        work arrays (e.g. im2col columns), from a one-sample forward."""
        elements = n_passes * self.layout.n_params
        for slot in self.slots:
            rule = rule_for(slot.link)
            for call in calls[slot.path]:
                elements += n_passes * call.out[0].size + call.x[0].size
                if rule is not None:
                    elements += rule.work(slot.link, call)
        return elements * np.dtype(self.dtype).itemsize

    def _fallback(self, x, seeds, slots, out):
        """Per-sample autograd loop for ``slots`` (one forward per sample,
        one chainer.grad per row)."""
        n_passes = len(seeds)
        params = [p for s in slots for p in s.params]
        entries = [e for s in slots for e in s.entries]
        xp = get_array_module(out)
        for i in range(len(x)):
            with chainer.using_config('train', False), \
                    chainer.using_config('enable_backprop', True):
                zi = self.model(x[i:i + 1])
            for r, seed in enumerate(seeds):
                grads = chainer.grad([zi], params, grad_outputs=[
                    chainer.Variable(seed[i:i + 1])])
                row = out[i * n_passes + r]
                for e, g in zip(entries, grads):
                    dest = row[e.offset:e.offset + e.size]
                    if g is None:
                        dest[...] = 0
                    else:
                        dest[...] = xp.asarray(g.array).reshape(-1)


# --------------------------------------------------------------------------
# Public extraction API
# --------------------------------------------------------------------------

def _check_inputs(model, x, labels):
    """Validate x (array, non-empty, same module as the model, a float x of
    the model's float dtype) and labels (None or int (n,)); returns labels
    as a host int64 array or None."""
    xp = get_array_module(x)
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or \
            isinstance(x, chainer.Variable):
        raise GradnetError(
            f'x must be a NumPy or CuPy array, not {type(x).__name__}')
    if x.ndim < 1 or x.shape[0] == 0:
        raise GradnetError(f'x must hold at least one sample; shape '
                           f'{tuple(x.shape)}')
    if xp is not model.xp:
        raise GradnetError(
            f'x is a {xp.__name__} array but the model lives on '
            f'{model.xp.__name__}: move one of them (model.to_device / '
            'backend.to_device)')
    dtypes = {p.dtype for p in model.params() if p.array is not None}
    if x.dtype.kind == 'f' and dtypes and x.dtype not in dtypes:
        raise GradnetError(
            f"x is {x.dtype} but the model's parameters are "
            f"{', '.join(sorted(map(str, dtypes)))}: cast x first "
            '(x.astype(...))')
    if labels is None:
        return None
    return int_labels(labels, len(x), 'labels')


class _Output:
    """Where chunk rows go: 'fresh' (a new array per chunk), 'reuse' (one
    chunk-sized buffer overwritten by every chunk) or 'whole' (slices of one
    array holding every row, kept in ``self.whole``)."""

    def __init__(self, mode):
        self.mode = mode
        self.whole = None
        self.buffer = None

    def rows(self, xp, dtype, n_params, total_rows, chunk_rows, start, n):
        if self.mode == 'fresh':
            return xp.empty((n, n_params), dtype)
        if self.mode == 'reuse':
            if self.buffer is None:
                self.buffer = xp.empty((chunk_rows, n_params), dtype)
            return self.buffer[:n]
        if self.whole is None:
            self.whole = xp.empty((total_rows, n_params), dtype)
        return self.whole[start:start + n]


class Objective:
    """A per-sample scalar objective ``l(z_i, c)`` of the model's output
    ``z`` (n, ...) whose parameter gradients are the tangent features.

    Subclass it for another objective: set :attr:`name`,
    :attr:`uses_candidates` and the expected output (:attr:`output_ndim`,
    :attr:`output_description`), and implement :meth:`seeds`. The engine runs one backward pass per seed; because the
    objective is a sum of per-sample terms, row ``i`` of a seed is sample
    ``i``'s own output gradient ``d l(z_i, c) / d z_i``.

    Supervised objectives (``uses_candidates = True``, e.g.
    :class:`CrossEntropy`) take a candidate label per row (the
    ``candidates=`` argument of :func:`tangent_features`) and read the
    number of candidates from ``z.shape[1]``. Unsupervised ones have one
    row per sample and no candidates: their rows carry ``candidate = -1``
    and ``candidates=`` is ignored.
    """

    name = 'objective'
    uses_candidates = False
    output_ndim = 2
    """Axes of the model output the objective is defined on (the first is
    the sample axis)."""
    output_description = 'logits of shape (n_samples, n_classes)'
    output_hint = ''
    """Appended to the error message of a mismatched output."""

    def check_output(self, z, x):
        """Raise :class:`GradnetError` unless ``z`` (the model's output on
        ``x``) is a Variable of :attr:`output_ndim` axes whose first is the
        sample axis of ``x``. Override for other checks."""
        if not isinstance(z, chainer.Variable) or \
                z.ndim != self.output_ndim or z.shape[0] != len(x):
            raise GradnetError(
                f'the model must return {self.output_description} for x of '
                f'shape {tuple(x.shape)}; it returned '
                f'{getattr(z, "shape", type(z))} (objective {self.name!r}'
                f'{self.output_hint})')

    def seeds(self, z, candidates):
        """Output gradients, one array per backward pass, each with
        ``z``'s shape and dtype and the array module of ``z``.

        z: (n, ...) output array. candidates: int array (n,) (one pass),
        the string ``'all'`` (one pass per class, pass ``c`` for
        candidate ``c``), or None for an unsupervised objective (one pass).
        """
        raise NotImplementedError


class CrossEntropy(Objective):
    """Softmax cross-entropy of the logits (n, C) for a candidate label
    ``c``: the seed is ``softmax(z) - e_c`` (the default objective)."""

    name = 'cross-entropy'
    uses_candidates = True

    output_hint = ('; an unsupervised model such as an RBM needs its own '
                   'objective, e.g. free-energy')

    def seeds(self, z, candidates):
        p = _softmax(z)
        return [p - hot for hot in _hots(z, candidates)]


class LogitJacobian(CrossEntropy):
    """Not an objective but the logits themselves: the seed ``e_k`` gives
    row ``d z_k / d theta`` (the engine of :func:`logit_jacobian`)."""

    name = 'logit-jacobian'

    def seeds(self, z, candidates):
        return _hots(z, candidates)


class OutputSum(Objective):
    """Unsupervised: the model's own per-sample scalar output, ``l(z_i) =
    z_i`` for an output of shape (n,) (e.g. an RBM returning its free
    energy F(v)); the seed is ones. :attr:`name` is given by the caller
    (default ``'output'``)."""

    def __init__(self, name='output'):
        self.name = name

    output_ndim = 1
    output_description = 'one scalar per sample, shape (n_samples,)'
    output_hint = ', e.g. an RBM\'s free energy; for a classifier use the ' \
        'cross-entropy objective'

    def seeds(self, z, candidates):
        xp = get_array_module(z)
        return [xp.ones_like(z)]


CROSS_ENTROPY = CrossEntropy()
"""The default objective of :func:`tangent_features`."""

_LOGIT_JACOBIAN = LogitJacobian()


def _hots(z, candidates):
    """One-hot arrays (n, C): one per class for ``'all'``, else one of the
    per-row candidates."""
    xp = get_array_module(z)
    n, n_classes = z.shape
    if isinstance(candidates, str):
        labels = [xp.full(n, c) for c in range(n_classes)]
    else:
        labels = [xp.asarray(candidates)]
    return [_one_hot(xp, lab, n_classes, z.dtype) for lab in labels]


def _check_objective(objective):
    if not isinstance(objective, Objective):
        raise GradnetError(f'objective must be a tangent Objective, not '
                           f'{type(objective).__name__}')


def _iterate(model, x, labels, *, objective, output, candidates='all',
             seed=0, layout=None, weight_decay=0.0, strict=False,
             max_bytes=MAX_BYTES, n_threads=None):
    """Shared driver of tangent features (any objective) and the logit
    Jacobian. Checks every input and runs one forward pass of the first
    sample now (errors are raised here, not on the first chunk), then
    returns a generator of TangentBatch chunks."""
    labels = _check_inputs(model, x, labels)
    _check_objective(objective)
    if n_threads is None:
        n_threads = _usable_cpus()
    elif int(n_threads) < 1:
        raise GradnetError(f'n_threads must be at least 1, not {n_threads}')
    if layout is None:
        layout = parameter_layout(model)
    ext = _Extraction(model, layout, objective, strict, weight_decay)
    n_total = len(x)
    z1, calls1 = ext.forward(x[:1])
    mode, explicit, n_passes = plan_rows(
        candidates, labels, n_total,
        z1.shape[1] if objective.uses_candidates else None, seed)
    per_chunk = samples_per_chunk(n_total, max_bytes,
                                  ext.sample_bytes(calls1, n_passes))
    del z1, calls1
    return _chunks(ext, x, labels, explicit, mode, n_passes, per_chunk,
                   output, int(n_threads))


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def _fill(ext, mode, x, candidates, out):
    """Forward, backward passes and rules for the samples ``x``."""
    z, calls = ext.forward(x)
    seeds = ext.objective.seeds(z.array,
                                'all' if mode == 'all' else candidates)
    ext.run_chunk(x, z, calls, seeds, out)


def _fill_threaded(ext, mode, x, candidates, out, n_threads):
    """:func:`_fill` over the fixed sub-batches of ``SUB_BATCH`` samples of
    ``x`` (NumPy only; one call on CuPy), BLAS limited to one thread, the
    sub-batches scheduled on ``n_threads`` threads. NumPy and BLAS release
    the GIL, so the sub-batches run in parallel; the bits are the same for
    every ``n_threads``."""
    n = len(x)
    if ext.model.xp is not np:
        return _fill(ext, mode, x, candidates, out)
    rows = len(out) // n
    starts = range(0, n, SUB_BATCH)
    with ThreadpoolController().limit(limits=1, user_api='blas'), \
            ThreadPoolExecutor(min(n_threads, len(starts))) as pool:
        futures = [pool.submit(
            _fill, ext, mode, x[a:a + SUB_BATCH],
            None if candidates is None else candidates[a:a + SUB_BATCH],
            out[a * rows:(a + SUB_BATCH) * rows]) for a in starts]
        for future in futures:
            future.result()


def _chunks(ext, x, labels, explicit, mode, n_passes, per_chunk,
            output, n_threads):
    xp = ext.model.xp
    n_total = len(x)
    n_params = ext.layout.n_params
    for start in range(0, n_total, per_chunk):
        stop = min(n_total, start + per_chunk)
        n = stop - start
        out = output.rows(xp, ext.dtype, n_params, n_total * n_passes,
                          per_chunk * n_passes, start * n_passes,
                          n * n_passes)
        cand = None if explicit is None else explicit[start:stop]
        _fill_threaded(ext, mode, x[start:stop], cand, out, n_threads)
        sample, candidate, target = row_labels(start, stop, mode, n_passes,
                                               explicit, labels)
        yield TangentBatch(out, xp.asarray(sample), xp.asarray(candidate),
                           xp.asarray(target))


def _collect(chunks, output):
    """One TangentBatch of every row, the features being ``output.whole``."""
    chunks = list(chunks)
    xp = get_array_module(chunks[0].features)
    meta = [xp.concatenate(parts) for parts in list(zip(*chunks))[1:]]
    return TangentBatch(output.whole, *meta)


def iter_tangent_features(model, x, labels=None, candidates='random', *,
                          objective=CROSS_ENTROPY, layout=None, seed=0,
                          weight_decay=0.0, strict=False, max_bytes=MAX_BYTES,
                          n_threads=None, reuse_buffer=False):
    """Tangent features in chunks of whole samples.

    model: a Chainer Link returning logits (n, C) (for the default
    objective). x: array (N, ...) in the model's array module. labels: int
    (N,) true labels or None (kept as ``target``).
    candidates: 'true' | 'random' | 'all' | int array (N,); ignored by an
    unsupervised objective. objective: the per-sample :class:`Objective`
    differentiated (default :data:`CROSS_ENTROPY`; an unsupervised one,
    e.g. ``OutputSum('free-energy')``, gives one row per sample with
    ``candidate = -1``). layout: a
    ParameterLayout (default ``parameter_layout(model)``). seed: int or
    np.random.Generator for 'random'. weight_decay: adds
    ``weight_decay * theta`` to every row's gradient of each selected
    parameter (as Chainer's WeightDecay hook would). strict: raise instead of
    the per-sample fallback. max_bytes: working-set budget of one chunk
    (see the module docstring; None: one chunk). n_threads: on the CPU,
    this many threads compute the chunk's ``SUB_BATCH``-sample sub-batches
    with single-threaded BLAS (default: the CPUs this process may use; the
    bits do not depend on it; ignored for CuPy). reuse_buffer: yield views into
    one buffer overwritten by the next chunk (saves fresh-memory page faults
    when the consumer copies or reduces each chunk before asking for the
    next).

    Yields :class:`TangentBatch` chunks; rows are sample-major.
    """
    return _iterate(
        model, x, labels, objective=objective, candidates=candidates,
        seed=seed, layout=layout, weight_decay=weight_decay, strict=strict,
        max_bytes=max_bytes, n_threads=n_threads,
        output=_Output('reuse' if reuse_buffer else 'fresh'))


def tangent_features(model, x, labels=None, candidates='random', *,
                     objective=CROSS_ENTROPY, layout=None, seed=0,
                     weight_decay=0.0, strict=False, max_bytes=MAX_BYTES,
                     n_threads=None):
    """All tangent-feature rows of ``x`` at once (see
    :func:`iter_tangent_features` for the arguments; ``max_bytes`` bounds the
    working chunk, the result holds every row). Returns a TangentBatch with
    features (rows, n_params): N rows, or N*C for ``candidates='all'``."""
    output = _Output('whole')
    return _collect(_iterate(
        model, x, labels, objective=objective, candidates=candidates,
        seed=seed,
        layout=layout, weight_decay=weight_decay, strict=strict,
        max_bytes=max_bytes, n_threads=n_threads, output=output), output)


def iter_logit_jacobian(model, x, labels=None, *, layout=None, strict=False,
                        max_bytes=MAX_BYTES, n_threads=None,
                        reuse_buffer=False):
    """Per-sample Jacobian rows of the logits in chunks: TangentBatch rows
    ``i*C + k`` hold d z_ik / d theta (``candidate`` = k; ``target`` the
    label or -1). Arguments as :func:`iter_tangent_features`."""
    return _iterate(
        model, x, labels, objective=_LOGIT_JACOBIAN, layout=layout,
        strict=strict,
        max_bytes=max_bytes, n_threads=n_threads,
        output=_Output('reuse' if reuse_buffer else 'fresh'))


def logit_jacobian(model, x, *, layout=None, strict=False,
                   max_bytes=MAX_BYTES, n_threads=None):
    """d z / d theta per sample: array (N, C, n_params) in the model's array
    module, ``[i, k]`` = gradient of logit k of sample i w.r.t. the layout's
    parameters."""
    output = _Output('whole')
    for _ in _iterate(model, x, None, objective=_LOGIT_JACOBIAN,
                      layout=layout,
                      strict=strict, max_bytes=max_bytes,
                      n_threads=n_threads, output=output):
        pass
    return output.whole.reshape(len(x), -1, output.whole.shape[1])
