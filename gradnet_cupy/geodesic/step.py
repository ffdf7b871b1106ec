"""One geodesic step: the trust-region quadratic program of 003, eq. 7.

Neighbours: :mod:`.targets` gives the unit direction ``v``, :mod:`.walk`
calls a solver once per step with the logit Jacobian of a fresh batch.

The problem. With ``J`` the (m, n) matrix of logit-Jacobian rows of a batch
(m = B*C rows, n selected parameters) and ``g = J^T J`` the output metric,

    theta* = argmin_theta  theta^T g theta - beta theta^T v
             subject to     theta^T theta <= eps.

Its KKT conditions give ``theta(mu) = (beta/2) (g + mu I)^-1 v`` with a
multiplier ``mu >= 0``, and ``mu > 0`` exactly when the constraint binds.
Write ``g = sum_i lam_i u_i u_i^T`` (``lam_i >= 0``) and ``c_i = u_i^T v``;
then

    ||theta(mu)||^2 = (beta/2)^2 sum_i c_i^2 / (lam_i + mu)^2,

a strictly decreasing function of ``mu`` (the *secular equation*), so the
``mu`` meeting ``||theta||^2 = eps`` is unique and found by a safeguarded
Newton iteration on ``1/||theta(mu)|| - 1/sqrt(eps)`` (nearly linear in
``mu``; Moré & Sorensen), bracketed by bisection (:func:`solve_mu`).

Why ``mu > 0`` always binds in practice: ``g`` has rank at most ``m``, and
whenever ``n > m`` (always, for a real network: a batch of 32 images and 10
classes gives 320 rows against 10^5 weights) ``v`` has a component ``v_perp``
in the null space of ``g``. Along it the objective is linear
(``-beta theta^T v_perp``) with no curvature, so the unconstrained problem is
unbounded and the minimum lies on the sphere: ``||theta(mu)||^2`` contains
``(beta/2)^2 ||v_perp||^2 / mu^2``, which is infinite at ``mu = 0``. Only
when ``v`` lies in the range of ``g`` (``n <= m`` or a degenerate ``v``)
can the unconstrained minimum ``(beta/2) g^+ v`` be inside the ball; then
``mu = 0`` and that point is returned.

Solvers (both return a :class:`Step`):

:func:`exact_step`
    ``g = J^T J`` exactly, without any n x n matrix: one eigendecomposition
    of the small Gram matrix ``K = J J^T = V diag(lam) V^T`` (m x m), then
    with ``a = V^T J v`` the range part of ``v`` has coefficients
    ``c_i^2 = a_i^2 / lam_i`` and ``v_perp = v - J^T V (a / lam)``; each
    ``mu`` costs O(m) and the step is the Woodbury identity written in that
    eigenbasis, ``theta = (beta/2) [v_perp / mu + J^T V (a / (lam (lam +
    mu)))]`` (no ``1/mu`` cancellation for small ``mu``).
:func:`block_step`
    ``g`` replaced by its diagonal blocks over a partition of the parameters
    (``per_layer`` or ``per_unit``: :func:`gradnet_cupy.metric.feature_metric`,
    accumulated by the package's ``block_outer_accumulate`` kernel on float32
    rows, or a dense float64 product). Each block is eigendecomposed once
    (batched ``eigh`` over equal sizes) and all blocks share one ``mu``, the
    same secular equation over the union of their eigenpairs.

The anchored step (a choice beyond 003, ``anchor > 0`` in :mod:`.walk`).
003's objective measures how far each step moves the batch's outputs from
where they *are*; summed over a walk these moves drift. Measuring them from
where they *started* instead, with ``r = f_w(x) - f_w0(x)`` (the logit
drift of the batch, rows ordered as ``J``'s), the Gauss-Newton model of
``||f_{w+theta}(x) - f_w0(x)||^2`` gives the QP

    argmin  ||J theta + r||^2 - beta theta^T v   s.t.  theta^T theta <= eps,

whose KKT conditions ``2 (g + mu I) theta = beta v - 2 J^T r`` are those of
the plain QP with ``v`` replaced by ``v - (2 / beta) J^T r``
(:func:`anchored_direction`), so the exact solver serves it unchanged.
With the block solver's metric in place of ``J^T J`` the term ``J^T r``
no longer models the drift (measured: the drift grows and the walk
stalls), so :class:`.walk.WalkSettings` refuses that combination.

Dtypes: ``J`` and ``v`` float32 or float64, NumPy or CuPy (one module);
Gram matrices, eigendecompositions and the returned ``theta`` are float64.
"""
from typing import NamedTuple

import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import CSR
from gradnet_cupy.metric import feature_metric

SOLVERS = ('exact', 'block')
BLOCK_PARTITIONS = ('per_layer', 'per_unit')
ACCUMULATIONS = ('auto', 'kernel', 'dense')
DEFAULT_BETA = 1.0
DEFAULT_EPS = 0.01          # 003, eq. 7
MU_RTOL = 1e-12             # |theta^T theta / eps - 1| at convergence
MU_MAX_ITER = 200


class Step(NamedTuple):
    """A solved step.

    ``theta``: float64 (n,) in the array module of ``J``; ``mu``: the
    multiplier (float, >= 0); ``norm2``: ``theta^T theta``; ``quad``:
    ``theta^T g theta`` with the solver's ``g`` (how much the batch's
    outputs move, to second order); ``gain``: ``theta^T v``.
    """
    theta: object
    mu: float
    norm2: float
    quad: float
    gain: float


def secular_norm2(mu, lam, weight, scale2):
    """``scale2 * sum_i weight_i / (lam_i + mu)^2`` (float; inf when a
    ``lam_i + mu`` is 0 with ``weight_i > 0``). ``lam``, ``weight``: float64
    NumPy (k,)."""
    denominator = lam + mu
    positive = weight > 0
    if np.any(denominator[positive] <= 0):
        return np.inf
    return float(scale2 * np.sum(weight[positive] / denominator[positive] ** 2))


def solve_mu(lam, weight, scale2, eps):
    """The ``mu >= 0`` of the trust-region step.

    ``lam``: eigenvalues of ``g`` (float64 NumPy (k,), >= 0); ``weight``:
    the squared coefficients ``c_i^2`` of ``v`` on them (same shape, >= 0;
    a zero eigenvalue carries the null-space part); ``scale2``:
    ``(beta/2)^2``; ``eps``: the squared radius. Returns 0.0 when
    ``secular_norm2(0) <= eps`` (the unconstrained minimum is inside the
    ball), else the unique ``mu > 0`` with ``secular_norm2(mu) = eps`` to
    relative accuracy :data:`MU_RTOL` (bisection-safeguarded Newton on
    ``1/sqrt(secular_norm2(mu)) - 1/sqrt(eps)``).
    """
    lam = np.asarray(lam, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    total = float(weight.sum())
    if not total > 0:
        raise GradnetError('the step direction v is zero: nothing to move '
                           'toward')
    if secular_norm2(0.0, lam, weight, scale2) <= eps:
        return 0.0
    # sum w/(lam+mu)^2 lies between total/(lam_max+mu)^2 and total/mu^2.
    upper = np.sqrt(scale2 * total / eps)
    low, high = max(0.0, upper - float(lam.max(initial=0.0))), upper
    mu = high
    target = 1.0 / np.sqrt(eps)
    for _ in range(MU_MAX_ITER):
        positive = weight > 0
        d = lam[positive] + mu
        f = scale2 * np.sum(weight[positive] / d ** 2)
        if abs(f / eps - 1.0) <= MU_RTOL:
            return float(mu)
        if f > eps:
            low = mu
        else:
            high = mu
        # h(mu) = f^-1/2 - eps^-1/2, h' = f^-3/2 * scale2 * sum w/d^3
        h = f ** -0.5 - target
        dh = f ** -1.5 * scale2 * np.sum(weight[positive] / d ** 3)
        candidate = mu - h / dh
        mu = candidate if low < candidate < high else 0.5 * (low + high)
        if high - low <= 4 * np.finfo(float).eps * high:
            return float(mu)
    return float(mu)


def _check_inputs(J, v, beta, eps):
    xp = get_array_module(J, v)
    if J.ndim != 2 or v.shape != (J.shape[1],):
        raise GradnetError(f'J must be (rows, n) and v (n,), got {J.shape} '
                           f'and {v.shape}')
    if not (beta > 0 and eps > 0):
        raise GradnetError(f'beta and eps must be > 0, got {beta}, {eps}')
    if not bool(xp.isfinite(J).all()):
        raise GradnetError('the logit Jacobian has non-finite entries (NaN '
                           'or inf weights or inputs?)')
    if not bool(xp.isfinite(v).all()):
        raise GradnetError('the target direction has non-finite entries')
    return xp


def _positive(lam, dtype=np.float64):
    """Mask of eigenvalues above rounding noise (relative to the largest)
    of a Gram matrix formed in ``dtype``."""
    top = float(lam.max()) if lam.size else 0.0
    return lam > max(top, 0.0) * lam.size * np.finfo(dtype).eps * 16


def exact_step(J, v, beta=DEFAULT_BETA, eps=DEFAULT_EPS):
    """The exact step for ``g = J^T J`` (module docstring), via the m x m
    Gram matrix ``J J^T``.

    ``J``: float32/float64 (m, n); ``v``: (n,) (any norm; 003 uses a unit
    vector). The O(m^2 n) and O(m n) products run in ``J``'s dtype (float32
    rows: float32 BLAS, four times faster than float64 on a CPU), the
    ``eigh`` of the Gram matrix and everything O(m) in float64; eigenvalues
    below the Gram matrix's rounding level (``lam_max * m * 16 * eps`` of
    ``J``'s dtype) count as zero curvature. Memory O(m^2 + n). Returns a
    :class:`Step` (``theta`` float64).
    """
    xp = _check_inputs(J, v, beta, eps)
    dtype = J.dtype if J.dtype in (np.float32, np.float64) else np.float64
    J = J.astype(dtype, copy=False)
    v = v.astype(np.float64, copy=False)
    lam, V = xp.linalg.eigh((J @ J.T).astype(np.float64))
    keep = _positive(lam, dtype)
    lam, V = lam[keep], V[:, keep]
    a = V.T @ (J @ v.astype(dtype)).astype(np.float64)

    def rows_to_columns(coefficient):        # J^T V coefficient, float64
        return (J.T @ (V @ coefficient).astype(dtype)).astype(np.float64)

    v_perp = v - rows_to_columns(a / lam)
    null2 = float(v_perp @ v_perp)
    if null2 <= 64 * np.finfo(dtype).eps * float(v @ v):
        null2, v_perp = 0.0, v_perp * 0    # v lies in the range of g
    lam_h = np.concatenate([np.asarray(to_numpy(lam)), [0.0]])
    weight_h = np.concatenate([np.asarray(to_numpy(a)) ** 2 / lam_h[:-1],
                               [null2]])
    scale2 = (beta / 2) ** 2
    mu = solve_mu(lam_h, weight_h, scale2, eps)
    theta = rows_to_columns(a / (lam * (lam + mu)))
    if mu > 0:
        theta = theta + v_perp / mu
    theta = (beta / 2) * theta
    return _finish(theta, mu, J, v)


def anchored_direction(J, v, drift, beta, anchor=1.0):
    """``v - anchor * (2 / beta) * J^T drift`` (float64 (n,)): the linear
    term that turns the plain QP into the anchored one (module docstring).

    ``J``: (m, n) float32/float64; ``v``: (n,); ``drift``: (m,) the logit
    drift ``f_w(x) - f_w0(x)`` of the batch, scaled and ordered as ``J``'s
    rows; ``anchor``: weight of the drift term (1: the Gauss-Newton model,
    0: 003's plain step). Raises :class:`GradnetError` for a drift of
    another length or with non-finite entries.
    """
    xp = get_array_module(J, v, drift)
    if drift.shape != (J.shape[0],):
        raise GradnetError(f'the drift must have one entry per row of J '
                           f'({J.shape[0]}), got shape {drift.shape}')
    if not bool(xp.isfinite(drift).all()):
        raise GradnetError('the output drift has non-finite entries')
    pull = (J.T @ drift.astype(J.dtype)).astype(np.float64)
    return v.astype(np.float64) - (anchor * 2.0 / beta) * pull


def _finish(theta, mu, J, v, quad=None):
    if quad is None:
        Jt = (J @ theta.astype(J.dtype)).astype(np.float64)
        quad = float(Jt @ Jt)
    return Step(theta, float(mu), float(theta @ theta), quad,
                float(theta @ v))


def dense_csr(rows):
    """The nonzeros of dense float rows (m, n) as a float32 :class:`CSR` of
    the same array module (the input of ``block_outer_accumulate``)."""
    xp = get_array_module(rows)
    rows = rows.astype(np.float32, copy=False)
    nonzero = rows != 0
    indptr = xp.zeros(rows.shape[0] + 1, dtype=np.int64)
    indptr[1:] = xp.cumsum(nonzero.sum(axis=1))
    _, columns = xp.nonzero(nonzero)
    return CSR(indptr, columns.astype(np.int32), rows[nonzero],
               tuple(rows.shape))


class BlockSolver:
    """Block-diagonal steps over one partition of a parameter layout.

    ``layout``: :class:`~gradnet_cupy.tangent.ParameterLayout`;
    ``partition``: ``'per_layer'`` (one block per link) or ``'per_unit'``
    (one block per output unit's fan-in); ``max_block``: cut longer blocks
    (None: no cap; a per_layer block of a large layer needs ``size^2``
    float64 entries and is refused by the metric's memory check);
    ``accumulate``: ``'kernel'`` (float32 CSR rows through
    ``block_outer_accumulate``: the CUDA kernel on the GPU), ``'dense'``
    (a float64 batched product per group of equal-size blocks), ``'auto'``
    (the kernel for CuPy ``J``, its rows cast to float32; dense for NumPy
    ``J``: on the CPU the kernel is its NumPy reference, slower than the
    BLAS product, ``bench/bench_geodesic.py``'s ``gram_seconds``).
    ``device``: 'cpu' or 'gpu'.
    """

    def __init__(self, layout, partition='per_unit', max_block=256,
                 accumulate='auto', device='cpu'):
        if partition not in BLOCK_PARTITIONS:
            raise GradnetError(f"unknown block partition {partition!r}: "
                               f"choose one of {', '.join(BLOCK_PARTITIONS)}")
        if accumulate not in ACCUMULATIONS:
            raise GradnetError(f"unknown accumulation {accumulate!r}: choose "
                               f"one of {', '.join(ACCUMULATIONS)}")
        self.layout, self.partition = layout, partition
        self.max_block, self.accumulate, self.device = (max_block, accumulate,
                                                        device)
        self.blocks = self._metric().blocks

    def _metric(self):
        return feature_metric(self.layout, partition=self.partition,
                              max_block=self.max_block or None,
                              device=self.device)

    def gram_blocks(self, J):
        """The packed float64 blocks ``G_b = J_b^T J_b`` (``blocks.packed_size``,)."""
        method = self.accumulate
        if method == 'auto':
            method = 'kernel' if get_array_module(J) is not np else 'dense'
        if method == 'kernel':
            return self._metric().accumulate(dense_csr(J)).G
        xp = get_array_module(J)
        packed = xp.zeros(self.blocks.packed_size, dtype=np.float64)
        for ids, size in self._groups():
            X = J[:, self._columns(xp, ids, size)].astype(np.float64)
            X = xp.ascontiguousarray(X.transpose(1, 0, 2))   # (k, m, s)
            G = xp.matmul(X.transpose(0, 2, 1), X)           # (k, s, s)
            packed[self._packed_index(xp, ids, size)] = G.reshape(len(ids), -1)
        return packed

    def _groups(self):
        sizes = self.blocks.sizes
        for size in np.unique(sizes):
            yield np.flatnonzero(sizes == size), int(size)

    def _columns(self, xp, ids, size):
        return xp.asarray(self.blocks.starts[ids])[:, None] + xp.arange(size)

    def _packed_index(self, xp, ids, size):
        return (xp.asarray(self.blocks.offsets[ids])[:, None]
                + xp.arange(size * size))

    def __call__(self, J, v, beta=DEFAULT_BETA, eps=DEFAULT_EPS):
        """The step with ``g`` replaced by its diagonal blocks. ``J``, ``v``
        as :func:`exact_step`; ``J.shape[1]`` must be the layout's
        ``n_params``. Returns a :class:`Step` whose ``quad`` is measured
        with the block metric."""
        xp = _check_inputs(J, v, beta, eps)
        if J.shape[1] != self.blocks.n_columns:
            raise GradnetError(f'J has {J.shape[1]} columns, the layout '
                               f'{self.blocks.n_columns}')
        v = v.astype(np.float64, copy=False)
        packed = self.gram_blocks(J)
        groups = []
        for ids, size in self._groups():
            G = packed[self._packed_index(xp, ids, size)].reshape(
                len(ids), size, size)
            lam, U = xp.linalg.eigh(G)
            lam = xp.maximum(lam, 0.0)
            columns = self._columns(xp, ids, size)
            c = xp.einsum('kst,ks->kt', U, v[columns])
            groups.append((columns, lam, U, c))
        all_lam = xp.concatenate([lam.ravel() for _, lam, _, _ in groups])
        all_c = xp.concatenate([c.ravel() for _, _, _, c in groups])
        lam_h = np.array(to_numpy(all_lam))
        lam_h[~_positive(lam_h)] = 0.0
        outside = xp.ones(v.shape[0], dtype=bool)
        for columns, _, _, _ in groups:
            outside[columns.ravel()] = False
        rest2 = float(v[outside] @ v[outside])
        weight_h = np.concatenate([np.asarray(to_numpy(all_c)) ** 2, [rest2]])
        mu = solve_mu(np.concatenate([lam_h, [0.0]]), weight_h,
                      (beta / 2) ** 2, eps)
        theta = xp.zeros_like(v)
        quad = 0.0
        start = 0
        for columns, lam, U, c in groups:
            lam_clean = xp.asarray(lam_h[start:start + lam.size]).reshape(
                lam.shape)
            start += lam.size
            denominator = lam_clean + mu
            with np.errstate(divide='ignore', invalid='ignore'):
                y = xp.where(c != 0, c / denominator, 0.0)
            theta[columns] = (beta / 2) * xp.einsum('kst,kt->ks', U, y)
            quad += float(((beta / 2) ** 2 * lam_clean * y * y).sum())
        if rest2 > 0:
            theta[outside] = (beta / 2) * v[outside] / mu
        return _finish(theta, mu, J, v, quad=quad)


def make_solver(solver, layout=None, partition='per_unit', max_block=256,
                accumulate='auto', device='cpu'):
    """A callable ``(J, v, beta, eps) -> Step``: :func:`exact_step` for
    ``solver='exact'``, a :class:`BlockSolver` for ``'block'``."""
    if solver == 'exact':
        return exact_step
    if solver == 'block':
        return BlockSolver(layout, partition, max_block, accumulate, device)
    raise GradnetError(f"unknown solver {solver!r}: choose one of "
                       f"{', '.join(SOLVERS)}")
