"""Saving and loading a fitted GradNet with its normalizer.

A folder holds ``gradnet.npz`` (the weights), ``gradnet.json`` (the model
config and whatever the caller adds: settings, history, summary) and the
normalizer's files (``normalizer.npz`` and any of its own, see
:meth:`gradnet_cupy.normalize.Normalizer.save`). Neighbours: :mod:`.model`
(what is saved), :mod:`gradnet_cupy.normalize` (the normalizer's half),
:mod:`.pipelines` (:func:`~.pipelines.save_fit`).
"""
import json
import os

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet.model import GradNet
from gradnet_cupy.normalize import load_normalizer
from gradnet_cupy.train_base import atomic_write, load_snapshot, save_snapshot


def save_gradnet(folder, model, normalizer, extra=None):
    """Write ``gradnet.npz`` (weights), the normalizer's files
    (``normalizer.npz`` and, for ``metric``, ``metric.h5``) and
    ``gradnet.json`` (model config + ``extra``) into ``folder``, each file
    atomically."""
    os.makedirs(folder, exist_ok=True)
    save_snapshot(model, os.path.join(folder, 'gradnet.npz'))
    normalizer.save(folder)
    text = json.dumps({'config': model.config(), **(extra or {})}, indent=1)
    atomic_write(os.path.join(folder, 'gradnet.json'),
                 lambda f: f.write(text.encode()))


def load_gradnet(folder, device='cpu'):
    """Read a GradNet saved by :func:`save_gradnet`: ``(model, normalizer,
    info)`` with the model on the CPU and the normalizer's own arrays (a
    ``metric``'s blocks) on ``device`` (the device of the batches it will
    see)."""
    try:
        with open(os.path.join(folder, 'gradnet.json')) as f:
            info = json.load(f)
        normalizer = load_normalizer(folder, device)
    except (OSError, ValueError, KeyError) as e:
        raise GradnetError(f'{folder}: not a saved GradNet ({e})') from e
    model = GradNet(**info['config'])
    load_snapshot(model, os.path.join(folder, 'gradnet.npz'))
    return model, normalizer, info
