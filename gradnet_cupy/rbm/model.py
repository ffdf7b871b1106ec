"""The Bernoulli restricted Boltzmann machine as a Chainer link: its free
energy, ``p(h|v)``, Gibbs steps, binary visible data, and snapshots.

Job: the model itself. Visible units ``v`` in {0, 1}^V, hidden units ``h``
in {0, 1}^H, energy ``E(v, h) = -b'v - c'h - h'Wv``; summing out ``h``
gives the free energy

    F(v) = -b'v - sum_j softplus(c_j + W_j v),   p(v) = exp(-F(v)) / Z.

Parameters live in two ``Linear`` links so that the tangent engine's Linear
rule gives their per-sample gradients without a loop: ``hidden`` (``W``
(H, V), its bias ``b`` is the hidden bias ``c`` (H,)) and ``visible``
(``W`` (1, V) is the visible bias ``b``, no bias of its own). Calling the
model on ``v`` (n, V) returns ``F(v)`` (n,) as a Variable.

Neighbours: :mod:`.training` (contrastive divergence), :mod:`.fisher` (the
Fisher score features), :mod:`.commands` (the CLI).
"""
import json
import os

import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.files import atomic_write
from gradnet_cupy.train_base import load_snapshot, save_snapshot

CONFIG_FILE = 'rbm.json'
SNAPSHOT_FILE = 'rbm.npz'


def sigmoid(a):
    """Logistic function of an array (any module), same dtype."""
    xp = get_array_module(a)
    return 1 / (1 + xp.exp(-a))


class RBM(chainer.Chain):
    """A Bernoulli RBM with ``n_visible`` visible and ``n_hidden`` hidden
    units; weights ``N(0, 0.01^2)`` from ``seed``, biases 0.

    ``forward(v)``: v (n, V) float -> free energy F(v) (n,) Variable.
    ``dtype``: float32 (default) or float64 parameters.
    """

    def __init__(self, n_visible, n_hidden, seed=0, dtype=np.float32):
        super().__init__()
        if int(n_hidden) < 1 or int(n_visible) < 1:
            raise GradnetError(
                f'an RBM needs at least one visible and one hidden unit; got '
                f'{n_visible} visible, {n_hidden} hidden')
        self.n_visible, self.n_hidden = int(n_visible), int(n_hidden)
        self.seed = int(seed)
        rng = np.random.RandomState(self.seed)
        W = (0.01 * rng.standard_normal((self.n_hidden, self.n_visible)))
        with self.init_scope(), chainer.using_config('dtype', dtype):
            self.hidden = L.Linear(self.n_visible, self.n_hidden,
                                   initialW=W.astype(dtype),
                                   initial_bias=np.zeros(self.n_hidden,
                                                         dtype))
            self.visible = L.Linear(self.n_visible, 1, nobias=True,
                                    initialW=np.zeros((1, self.n_visible),
                                                      dtype))

    @property
    def W(self):
        """(H, V) weight array."""
        return self.hidden.W.array

    @property
    def b(self):
        """(V,) visible bias array (a view of ``visible.W``)."""
        return self.visible.W.array[0]

    @property
    def c(self):
        """(H,) hidden bias array."""
        return self.hidden.b.array

    def config(self):
        return {'n_visible': self.n_visible, 'n_hidden': self.n_hidden,
                'seed': self.seed}

    def forward(self, v):
        return -self.visible(v)[:, 0] - F.sum(F.softplus(self.hidden(v)),
                                               axis=1)

    def free_energy(self, v):
        """F(v) (n,) as an array, no graph; v (n, V)."""
        xp = get_array_module(v)
        a = v @ self.W.T + self.c
        return -(v @ self.b) - xp.logaddexp(0, a).sum(axis=1)

    def hidden_probabilities(self, v):
        """p(h_j = 1 | v) = sigmoid(c + W v): (n, H) array for v (n, V)."""
        return sigmoid(v @ self.W.T + self.c)

    def visible_probabilities(self, h):
        """p(v_i = 1 | h) = sigmoid(b + W'h): (n, V) array for h (n, H)."""
        return sigmoid(h @ self.W + self.b)

    def gibbs_step(self, v, u_hidden, u_visible):
        """One Gibbs sweep v -> h -> v' with given uniforms: ``h = u_hidden
        < p(h|v)``, ``v' = u_visible < p(v|h)``. Returns ``(h, v')`` in
        ``v``'s dtype; u_hidden (n, H), u_visible (n, V)."""
        h = (u_hidden < self.hidden_probabilities(v)).astype(v.dtype)
        v = (u_visible < self.visible_probabilities(h)).astype(v.dtype)
        return h, v


def check_binary(v, what='visible data'):
    """Raise :class:`GradnetError` unless every value of ``v`` is 0 or 1."""
    xp = get_array_module(v)
    if v.size and not bool(xp.all((v == 0) | (v == 1))):
        raise GradnetError(
            f'{what} must be binary (0/1) for a Bernoulli RBM; got values in '
            f'[{float(v.min()):g}, {float(v.max()):g}]: declare a '
            'binarization (e.g. --binarize 0.5)')


def binarize(x, threshold=None):
    """Flatten images (n, ...) to (n, V) float32 visible vectors; with a
    ``threshold`` in (0, 1) values above it become 1, the rest 0. Without
    one the data must already be binary (else :class:`GradnetError`)."""
    v = x.reshape(len(x), -1)
    if threshold is None:
        check_binary(v)
        return v.astype(np.float32)
    if not 0 < float(threshold) < 1:
        raise GradnetError(f'binarization threshold must be in (0, 1), not '
                           f'{threshold}')
    return (v > threshold).astype(np.float32)


def save_rbm(folder, rbm, extra=None):
    """Write ``rbm.npz`` (Chainer npz, as the base networks' snapshots) and
    ``rbm.json`` (config + ``extra``) into ``folder``, atomically; returns
    the snapshot path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SNAPSHOT_FILE)
    rbm.to_cpu()
    save_snapshot(rbm, path)
    text = json.dumps({'config': rbm.config(), **(extra or {})}, indent=1)
    atomic_write(os.path.join(folder, CONFIG_FILE),
                 lambda f: f.write(text.encode()))
    return path


def load_rbm(snapshot):
    """An RBM (on the CPU) from a snapshot npz written by :func:`save_rbm`;
    the sizes are read from the snapshot's arrays."""
    try:
        with np.load(snapshot) as npz:
            n_hidden, n_visible = npz['hidden/W'].shape
            dtype = npz['hidden/W'].dtype
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise GradnetError(f'{snapshot}: not an RBM snapshot ({e})') from e
    return load_snapshot(RBM(n_visible, n_hidden, dtype=dtype), snapshot)
