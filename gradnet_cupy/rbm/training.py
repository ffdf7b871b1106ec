"""Contrastive divergence (CD-k, optionally persistent) for :class:`RBM`.

Job: one CD-k update from given uniforms (:func:`cd_gradients`,
:func:`cd_step`) and the epoch loop (:func:`train_rbm`). Array-module
agnostic: the model and the data may live on NumPy or CuPy; the uniforms are
drawn from the array module's ``RandomState`` (seeded), once per step, and
can be passed in to reproduce a step exactly.

The CD-k gradient of the mean log-likelihood over a batch v0 (n, V)::

    h-chain: for s in 1..k:  h_s = [u_h < p(h|v_{s-1})],
                             v_s = [u_v < p(v|h_s)]
    dW = (p(h|v0)' v0 - p(h|vk)' vk) / n
    db = mean(v0 - vk),  dc = mean(p(h|v0) - p(h|vk))

With persistent chains (PCD) the chain starts from the previous step's
``vk`` instead of ``v0``. Parameters move along the gradient through a
Chainer optimizer (the negated gradient is the parameter's ``grad``).

Neighbours: :mod:`.model` (the RBM), :mod:`.commands` (``train-rbm``).
"""
import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.rbm.model import check_binary


def draw_uniforms(xp_random, k, n, n_visible, n_hidden, dtype):
    """The uniforms of one CD-k step: ``(u_hidden (k, n, H), u_visible
    (k, n, V))`` from a NumPy/CuPy ``RandomState``."""
    return (xp_random.uniform(size=(k, n, n_hidden)).astype(dtype),
            xp_random.uniform(size=(k, n, n_visible)).astype(dtype))


def cd_gradients(rbm, v0, uniforms, chain=None):
    """The CD-k gradient estimate (ascent direction) for a batch.

    rbm: :class:`RBM`; v0 (n, V) binary data; uniforms: from
    :func:`draw_uniforms` (k = their first axis); chain: (n, V) start of
    persistent chains, or None to start at v0. Returns ``(dW (H, V),
    db (V,), dc (H,), vk (n, V))``.
    """
    u_hidden, u_visible = uniforms
    ph0 = rbm.hidden_probabilities(v0)
    v = v0 if chain is None else chain
    for u_h, u_v in zip(u_hidden, u_visible):
        _, v = rbm.gibbs_step(v, u_h, u_v)
    phk = rbm.hidden_probabilities(v)
    n = len(v0)
    dW = (ph0.T @ v0 - phk.T @ v) / n
    db = (v0 - v).mean(axis=0)
    dc = (ph0 - phk).mean(axis=0)
    return dW, db, dc, v


def cd_step(rbm, optimizer, v0, uniforms, chain=None):
    """One CD-k update of ``rbm`` by ``optimizer`` (set up on it); returns
    the chain end ``vk`` (n, V) (the next start of persistent chains)."""
    dW, db, dc, vk = cd_gradients(rbm, v0, uniforms, chain)
    rbm.hidden.W.grad = -dW
    rbm.hidden.b.grad = -dc
    rbm.visible.W.grad = -db[None, :]
    optimizer.update()
    return vk


def reconstruction_error(rbm, v):
    """Mean squared error of the mean-field reconstruction p(v|p(h|v))."""
    recon = rbm.visible_probabilities(rbm.hidden_probabilities(v))
    return float(((v - recon) ** 2).mean())


def train_rbm(rbm, v, epochs=10, batch=20, lr=0.05, momentum=0.5, k=1,
              persistent=False, seed=0, weight_decay=0.0):
    """Train ``rbm`` in place by CD-k on binary data ``v`` (N, V) (same array
    module as the model); minibatches shuffled per epoch from ``seed``;
    MomentumSGD(lr, momentum), optional weight decay; the last partial
    batch of an epoch is dropped. Returns the history: one dict per epoch
    (epoch, steps, reconstruction error)."""
    if k < 1 or batch < 1 or epochs < 0:
        raise GradnetError(f'CD needs k >= 1, batch >= 1, epochs >= 0; got '
                           f'k={k}, batch={batch}, epochs={epochs}')
    if v.ndim != 2 or v.shape[1] != rbm.n_visible:
        raise GradnetError(f'visible data of shape {tuple(v.shape)} does '
                           f'not fit an RBM with {rbm.n_visible} visible '
                           'units')
    check_binary(v)
    batch = min(int(batch), len(v))
    xp = get_array_module(v)
    if xp is not rbm.xp:
        raise GradnetError('move the data and the RBM to the same device')
    optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum)
    optimizer.setup(rbm)
    if weight_decay:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(weight_decay))
    random = xp.random.RandomState(seed)
    order_rng = np.random.default_rng(seed)
    v = v.astype(rbm.W.dtype, copy=False)
    chain = None
    history, steps = [], 0
    for epoch in range(1, epochs + 1):
        order = xp.asarray(order_rng.permutation(len(v)))
        for start in range(0, len(v) - batch + 1, batch):
            vb = v[order[start:start + batch]]
            uniforms = draw_uniforms(random, k, batch, rbm.n_visible,
                                     rbm.n_hidden, vb.dtype)
            end = cd_step(rbm, optimizer, vb, uniforms,
                          chain if persistent else None)
            chain = end if persistent else None
            steps += 1
        history.append({'epoch': epoch, 'steps': steps,
                        'reconstruction_error': reconstruction_error(rbm, v)})
    return history
