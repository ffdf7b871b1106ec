"""Saving and loading a fitted GradNet with its normalizer, and the fit's
working folder (checkpoints, resume, the atomic install of the result).

A finished folder holds ``gradnet.npz`` (the weights), ``gradnet.json``
(the model config and whatever the caller adds: settings, history,
summary) and the normalizer's files (``normalizer.npz`` and any of its own,
see :meth:`gradnet_cupy.normalize.Normalizer.save`). A fit works in
``OUT.partial`` (:class:`FitFolder`): ``checkpoint.npz`` after every epoch
(weights, optimizer state, NumPy's global random state and the loop's
state, one file written atomically), then the finished files, and the
folder is renamed to ``OUT`` in one step, so ``OUT`` never holds a half
of a fit. Neighbours: :mod:`.model` (what is saved),
:mod:`gradnet_cupy.normalize` (the normalizer's half), :mod:`.training`
(whose loop state is checkpointed), :mod:`.pipelines`
(:func:`~.pipelines.save_fit`).
"""
import json
import os
import shutil

import numpy as np

from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.errors import GradnetError, naming
from gradnet_cupy.gradnet.model import GradNet
from gradnet_cupy.normalize import load_normalizer
from gradnet_cupy.files import atomic_write
from gradnet_cupy.train_base import load_snapshot, save_snapshot

WORK_SUFFIX = '.partial'
CHECKPOINT = 'checkpoint.npz'


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


def state_arrays(model, optimizer):
    """``model``'s and ``optimizer``'s arrays as one dict of host arrays
    (keys ``model/...``, ``optimizer/...``)."""
    target = chainer.serializers.DictionarySerializer()
    target['model'].save(model)
    target['optimizer'].save(optimizer)
    return target.target


def load_state_arrays(arrays, model, optimizer):
    """Restore ``model`` and ``optimizer`` from :func:`state_arrays`
    (a dict or an open npz)."""
    chainer.serializers.NpzDeserializer(arrays, path='model/').load(model)
    chainer.serializers.NpzDeserializer(arrays, path='optimizer/').load(
        optimizer)


def _settings_differ(found, expected):
    keys = sorted(set(found) | set(expected))
    return ', '.join(f'{k}: {found.get(k)!r} (now {expected.get(k)!r})'
                     for k in keys if found.get(k) != expected.get(k))


class FitFolder:
    """Where one fit with ``settings`` (a JSON-able dict of everything that
    decides its result) goes: the final folder ``out`` and its working
    folder ``out.partial``.

    ``done``: the ``gradnet.json`` of ``out`` when it already holds this
    fit (nothing to train). A folder holding another fit, or a working
    folder of another fit, is refused (GradnetError naming the settings
    that differ) unless ``overwrite``, which starts anew (a folder that is
    neither empty nor a fit is never replaced).
    """

    def __init__(self, out, settings, overwrite=False):
        self.out = os.path.abspath(out)
        self.work = self.out + WORK_SUFFIX
        self.settings = json.loads(json.dumps(settings))
        self.done = None
        if os.path.exists(self.out):
            if not overwrite:
                self.done = self._info(self.out)
            elif not (os.path.isdir(self.out) and (
                    not os.listdir(self.out) or os.path.exists(
                        os.path.join(self.out, 'gradnet.json')))):
                raise GradnetError(
                    f'{self.out} is not a fit of gradnet-cupy (no '
                    'gradnet.json): refusing to replace it; choose another '
                    '--out')
        if os.path.isdir(self.work):
            if overwrite:
                shutil.rmtree(self.work)
            else:
                self._info(self.work)

    def _info(self, folder):
        path = os.path.join(folder, 'gradnet.json')
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            raise GradnetError(
                f'{folder} exists and is not a fit of gradnet-cupy (no '
                'readable gradnet.json): choose another --out or pass '
                '--overwrite') from None
        problems = _settings_differ(info.get('settings', {}), self.settings)
        if problems:
            raise GradnetError(
                f'{folder} holds a fit with other settings ({problems}): '
                're-run with the same arguments, or pass --overwrite')
        return info

    def start(self):
        """Create the working folder (with a ``gradnet.json`` naming the
        settings, so that a rerun can tell whose it is)."""
        os.makedirs(self.work, exist_ok=True)
        text = json.dumps({'settings': self.settings}, indent=1)
        atomic_write(os.path.join(self.work, 'gradnet.json'),
                     lambda f: f.write(text.encode()))

    def save_checkpoint(self, model, optimizer, state):
        """After an epoch: ``model``'s and ``optimizer``'s arrays, NumPy's
        global random state and the loop ``state`` (JSON-able: epoch,
        iteration, history, pending losses) in one atomic file."""
        kind, keys, pos, gauss, cached = np.random.get_state()
        arrays = dict(state_arrays(model, optimizer), rng_keys=keys,
                      rng=np.array([pos, gauss, cached], dtype=np.float64),
                      state=np.frombuffer(json.dumps(state).encode(),
                                          np.uint8))
        atomic_write(os.path.join(self.work, CHECKPOINT),
                     lambda f: np.savez(f, **arrays))

    def load_checkpoint(self, model, optimizer):
        """The loop state of the last completed epoch, with ``model``,
        ``optimizer`` and NumPy's random state restored; None when no epoch
        was completed."""
        path = os.path.join(self.work, CHECKPOINT)
        if not os.path.exists(path):
            return None
        with np.load(path) as npz:
            load_state_arrays(npz, model, optimizer)
            pos, gauss, cached = npz['rng']
            np.random.set_state(('MT19937', npz['rng_keys'], int(pos),
                                 int(gauss), float(cached)))
            return json.loads(npz['state'].tobytes())

    def install(self, model, normalizer, extra):
        """Write the finished fit into the working folder, drop the
        checkpoint and rename the folder to ``out`` (replacing an old
        ``out`` only when the fit was started with ``overwrite``)."""
        with naming(self.work):
            save_gradnet(self.work, model, normalizer,
                         {'settings': self.settings, **extra})
        for name in os.listdir(self.work):
            if name == CHECKPOINT or name.endswith('.tmp'):
                os.remove(os.path.join(self.work, name))
        if os.path.exists(self.out):
            shutil.rmtree(self.out)
        os.rename(self.work, self.out)
