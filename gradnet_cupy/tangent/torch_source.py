"""A PyTorch module as a tangent source (docs/torch.rst).

Job: per-sample cross-entropy gradient rows of a ``torch.nn.Module`` through
``torch.func`` (``functional_call``, ``vjp``, ``vmap``), with the same
layout structure, candidate modes, row order and memory-bounded chunks as
the Chainer engine (:mod:`gradnet_cupy.tangent.source`), so that the
sparsifier, the store, the metric and GradNet take its rows unchanged; and
loading a module from a factory and a state dict (``extract --framework
torch``). torch is imported when a torch path is used, never at package
import: without it, only those paths fail, with a one-line
:class:`GradnetError` naming ``pip install "gradnet-cupy[torch]"``.

How a row is computed: per sample ``x_i`` (``vmap`` over the chunk), one
forward ``z_i = f(theta, x_i)`` through ``functional_call`` with the
selected parameters as the differentiated inputs (every other parameter
and buffer fixed), then ``torch.func.vjp``'s pullback, ``vmap``-ed over the
``R`` seeds ``softmax(z_i) - e_c`` (the cross-entropy's logit gradient of
candidate ``c``: ``R = C`` for ``'all'``, else 1). No per-sample Python
loop; any module ``torch.func`` can trace works, whatever its layers (the
gradients are autograd's, not per-layer rules).

The layout: one entry per selected parameter, one block per module, blocks
in the module's registration order (``named_modules``), like
:func:`~gradnet_cupy.tangent.parameter_layout`: path ``'/layer1/0/conv1'``
(the module name with ``/`` for ``.``; ``'/'`` for the root), name ``'W'``
for ``weight`` and ``'b'`` for ``bias`` (Chainer's names, so per-unit
partitions and every consumer of a layout read it alike), ``shape`` as in
torch (Linear (out, in); Conv (out, in / groups, *kernel), the layout of
Chainer's W), ``link_type`` the torch class name (``'Conv2d'``).

Devices: a module on the CPU takes NumPy input (``torch.from_numpy``, no
copy) and returns NumPy rows (``Tensor.numpy()``, no copy); a module on a
CUDA device takes CuPy input (``torch.from_dlpack``) and returns CuPy rows
through ``cupy.from_dlpack`` (no host copy; DLPack orders the exchange on
the consumer's current stream). Rows are computed in IEEE float32/float64:
TF32 tensor-core math, torch's default for cuDNN convolutions on Ampere and
later GPUs, is switched off for the duration of each chunk and restored
after (:func:`ieee_precision`). The CUDA path runs in the GPU tier
(tests/gpu/test_torch_source_gpu.py), not in CI; see docs/torch.rst.
"""
import contextlib
import importlib.util
from pathlib import Path

import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.tangent.engine import CROSS_ENTROPY
from gradnet_cupy.tangent.layout import ParameterEntry, _checked_layout
from gradnet_cupy.tangent.source import (
    MAX_BYTES, TangentBatch, TangentSource, int_labels, plan_rows,
    row_labels, samples_per_chunk)

INSTALL = 'pip install "gradnet-cupy[torch]"'
PARAM_NAMES = {'weight': 'W', 'bias': 'b'}
"""torch parameter name -> layout entry name (Chainer's)."""


@contextlib.contextmanager
def ieee_precision(torch):
    """TF32 off for torch's cuDNN convolutions and CUDA matrix products
    inside the block, the previous settings restored after. TF32 rounds
    float32 inputs to a 10-bit mantissa; on the H200 (2026-12-04) the cnn's
    rows from torch differed from the float32 Chainer engine's by 4.2% of
    their largest entry with torch's defaults (the mlp's, without
    convolutions, by 0). Uses ``fp32_precision`` (torch >= 2.9), else the
    legacy ``allow_tf32`` flags; mixing the two APIs is an error in torch."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, 'conv') and hasattr(matmul, 'fp32_precision'):
        flags = [(cudnn.conv, 'fp32_precision', 'ieee'),
                 (matmul, 'fp32_precision', 'ieee')]
    else:
        flags = [(cudnn, 'allow_tf32', False), (matmul, 'allow_tf32', False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def import_torch():
    """The ``torch`` module, or a one-line GradnetError saying how to get
    it."""
    try:
        import torch
        import torch.func  # noqa: F401  (the transforms used below)
    except ImportError as error:
        raise GradnetError(f'the PyTorch source needs torch ({error}): '
                           f'{INSTALL}') from None
    return torch


def _selectable(torch):
    nn = torch.nn
    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _path(name):
    return '/' + name.replace('.', '/') if name else '/'


def torch_layout(module, *, include_bias=False, modules=None):
    """Select the parameters of ``module`` whose per-sample gradients form
    the features.

    Default: ``weight`` of every ``Linear`` and ``Conv1d/2d/3d`` submodule
    (as :func:`~gradnet_cupy.tangent.parameter_layout` takes W of every
    Linear/Convolution2D link); ``include_bias`` adds their ``bias``.
    ``modules``: explicit module names (``'layer1.0.conv1'`` or the layout
    path ``'/layer1/0/conv1'``) replacing the type selection; each gives
    its ``weight`` (and ``bias`` with ``include_bias``).

    Returns ``(layout, names)``: the ParameterLayout and the torch name
    (``'layer1.0.conv1.weight'``) of each entry. A parameter shared by two
    modules is selected once, at its first module. GradnetError for an
    empty selection, an unknown name or a module without a ``weight``.
    """
    torch = import_torch()
    named = list(module.named_modules())
    if modules is None:
        kinds = _selectable(torch)
        chosen = [(n, m) for n, m in named if isinstance(m, kinds)]
    else:
        wanted = {str(p).strip('/').replace('/', '.') for p in modules}
        known = {n for n, _ in named}
        unknown = sorted(wanted - known)
        if unknown:
            raise GradnetError(
                f'module {unknown[0]!r} is not in the model; its modules '
                'are: ' + ', '.join(n or '(root)' for n in sorted(known)))
        chosen = [(n, m) for n, m in named if n in wanted]
    entries, names, seen, offset = [], [], set(), 0
    for name, sub in chosen:
        own = dict(sub.named_parameters(recurse=False))
        if 'weight' not in own:
            raise GradnetError(f'module {name!r} ({type(sub).__name__}) has '
                               'no weight of its own')
        for pname in ('weight', 'bias') if include_bias else ('weight',):
            param = own.get(pname)
            if param is None or id(param) in seen:
                continue
            if isinstance(param, torch.nn.parameter.UninitializedParameter):
                raise GradnetError(
                    f'parameter {name}.{pname} is not initialized (a lazy '
                    'module): run one forward pass of the model first')
            seen.add(id(param))
            shape = tuple(int(s) for s in param.shape)
            size = int(np.prod(shape, dtype=np.int64))
            entries.append(ParameterEntry(_path(name), PARAM_NAMES[pname],
                                          shape, offset, size,
                                          type(sub).__name__))
            names.append(f'{name}.{pname}' if name else pname)
            offset += size
    if not entries:
        kinds = '/'.join(k.__name__ for k in _selectable(torch))
        raise GradnetError(
            f'the module {type(module).__name__} has no {kinds} layer to '
            'take per-sample gradients of (or none selected)')
    return _checked_layout(tuple(entries)), names


def _check_eval_mode(torch, module):
    """GradnetError when a BatchNorm or Dropout layer is in training mode
    (its rows would mix samples or be random)."""
    modes = (torch.nn.modules.batchnorm._BatchNorm,
             torch.nn.modules.dropout._DropoutNd)
    training = [(n, m) for n, m in module.named_modules()
                if m.training and isinstance(m, modes)]
    if training:
        name, sub = training[0]
        raise GradnetError(
            f'the module {type(module).__name__} is in training mode and '
            f'has {type(sub).__name__} {_path(name)!r}'
            + (f' and {len(training) - 1} more' if len(training) > 1 else '')
            + ': call model.eval() first (rows use the running statistics '
            'and no dropout, as the Chainer engine does)')


class TorchSource(TangentSource):
    """Per-sample cross-entropy gradient rows of a ``torch.nn.Module``.

    module: returns logits (n, C) for input (n, ...); in eval mode when it
    has BatchNorm or Dropout layers; its parameters on one device (CPU or
    CUDA) of one float dtype. include_bias, modules: the selection of
    :func:`torch_layout`. Rows have the selected parameters' dtype and
    follow :mod:`gradnet_cupy.tangent.source` (order, candidates,
    chunks). ``reuse_buffer`` is accepted and has no effect (every chunk is
    fresh memory).
    """

    framework = 'torch'
    objective = CROSS_ENTROPY

    def __init__(self, module, *, include_bias=False, modules=None):
        torch = import_torch()
        if not isinstance(module, torch.nn.Module):
            raise GradnetError(f'the torch source needs a torch.nn.Module, '
                               f'not {type(module).__name__}')
        _check_eval_mode(torch, module)
        self.torch = torch
        self.module = module
        self.layout, self.names = torch_layout(
            module, include_bias=include_bias, modules=modules)
        params = dict(module.named_parameters())
        selected = [params[n] for n in self.names]
        devices = {p.device for p in selected}
        dtypes = {p.dtype for p in selected}
        if len(devices) > 1 or len(dtypes) > 1:
            raise GradnetError(
                'the selected parameters must share one device and dtype; '
                f'found {sorted(map(str, devices | dtypes))}')
        self.device, = devices
        self.dtype, = dtypes
        self.params = {n: p.detach() for n, p in zip(self.names, selected)}
        self.fixed = {n: t.detach() for n, t in
                      list(module.named_parameters())
                      + list(module.named_buffers())
                      if n not in self.params}
        self._rows = torch.func.vmap(self._sample_rows, in_dims=(None, 0, 0))

    def _sample_rows(self, params, xi, hots):
        """Rows (R, n_params) of one sample ``xi`` (...) for the R one-hot
        candidates ``hots`` (R, C)."""
        torch = self.torch

        def logits(p):
            return torch.func.functional_call(
                self.module, (p, self.fixed), (xi.unsqueeze(0),))[0]

        z, pullback = torch.func.vjp(logits, params)
        seeds = torch.softmax(z.detach(), dim=-1) - hots
        grads, = torch.func.vmap(pullback)(seeds)
        return torch.cat([grads[n].reshape(len(hots), -1)
                          for n in self.names], dim=1)

    def _to_torch(self, a):
        """A NumPy (CPU module) or CuPy (CUDA module) array as a tensor on
        the module's device, without a copy."""
        if get_array_module(a) is np:
            return self.torch.from_numpy(np.ascontiguousarray(a))
        return self.torch.from_dlpack(a)

    def _from_torch(self, t, xp):
        """Rows tensor -> NumPy (``.numpy()``, no copy) or CuPy (DLPack)."""
        if xp is np:
            return t.numpy()
        return xp.from_dlpack(t)

    def _check_x(self, x):
        xp = get_array_module(x)
        if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
            raise GradnetError(
                f'x must be a NumPy or CuPy array, not {type(x).__name__}')
        if x.ndim < 1 or x.shape[0] == 0:
            raise GradnetError(f'x must hold at least one sample; shape '
                               f'{tuple(x.shape)}')
        if (xp is np) != (self.device.type == 'cpu'):
            raise GradnetError(
                f'x is a {xp.__name__} array but the module lives on '
                f'{self.device}: NumPy input for a CPU module, CuPy for CUDA')
        if x.dtype != self._numpy_dtype():
            raise GradnetError(
                f"x is {x.dtype} but the module's selected parameters are "
                f'{self.dtype}: cast x first (x.astype(...))')
        return xp

    def _numpy_dtype(self):
        return self.torch.empty((), dtype=self.dtype).numpy().dtype

    def _forward_one(self, x1):
        """Logits of the first sample and the elements of every module
        output (activations) of that one-sample forward."""
        torch = self.torch
        sizes = []

        def count(_, __, out):
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
        hooks = [m.register_forward_hook(count)
                 for m in self.module.modules()]
        try:
            with torch.no_grad():
                z = self.module(x1)
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or len(z) != 1:
            raise GradnetError(
                'the module must return logits of shape (n_samples, '
                f'n_classes) for x of shape {tuple(x1.shape)}; it returned '
                f'{tuple(getattr(z, "shape", ())) or type(z).__name__} '
                "(objective 'cross-entropy')")
        return z, sum(sizes)

    def sample_bytes(self, activations, n_passes):
        """Estimated working bytes per sample: the rows (twice: the
        per-parameter gradients and their concatenation) and the forward
        activations kept for ``n_passes`` pullbacks. An estimate: torch's
        own temporaries come on top."""
        elements = 2 * n_passes * self.layout.n_params \
            + (n_passes + 1) * activations
        return elements * self.torch.empty((), dtype=self.dtype).element_size()

    def iter_rows(self, x, labels=None, candidates='random', *, seed=0,
                  max_bytes=MAX_BYTES, reuse_buffer=False):
        xp = self._check_x(x)
        labels = None if labels is None else \
            int_labels(labels, len(x), 'labels')
        xt = self._to_torch(x)
        z1, activations = self._forward_one(xt[:1])
        n_classes = z1.shape[1]
        mode, explicit, n_passes = plan_rows(candidates, labels, len(x),
                                             n_classes, seed)
        per_chunk = samples_per_chunk(len(x), max_bytes, self.sample_bytes(
            activations, n_passes))
        return self._chunks(xt, xp, labels, mode, explicit, n_passes,
                            n_classes, per_chunk)

    def _chunks(self, xt, xp, labels, mode, explicit, n_passes, n_classes,
                per_chunk):
        torch = self.torch
        eye = torch.eye(n_classes, dtype=self.dtype, device=self.device)
        for start in range(0, len(xt), per_chunk):
            stop = min(len(xt), start + per_chunk)
            if mode == 'all':
                hots = eye.expand(stop - start, n_classes, n_classes)
            else:
                hots = eye[torch.from_numpy(explicit[start:stop]).to(
                    self.device)].unsqueeze(1)
            with torch.no_grad(), ieee_precision(torch):
                rows = self._rows(self.params, xt[start:stop], hots)
            sample, candidate, target = row_labels(
                start, stop, mode, n_passes, explicit, labels)
            yield TangentBatch(
                self._from_torch(rows.reshape(-1, self.layout.n_params), xp),
                xp.asarray(sample), xp.asarray(candidate), xp.asarray(target))


def load_module(factory, weights, device='cpu'):
    """The module of ``factory`` (``'path/to/model.py:name'``: a callable
    taking no arguments that returns a ``torch.nn.Module``) with the state
    dict of the file ``weights`` (``torch.save(model.state_dict(), ...)``)
    loaded, on ``device`` ('cpu' or 'gpu'). The module is left in the mode
    the factory returns it in (TorchSource refuses training-mode BatchNorm).

    GradnetError (one line) for a malformed spec, a file that does not
    import, a missing or failing factory, a result that is not a Module, a
    weights file that is not a state dict, a state dict that does not match
    the module (missing / unexpected keys, shapes), or 'gpu' with a torch
    that sees no CUDA device.
    """
    torch = import_torch()
    path, _, name = str(factory).rpartition(':')
    if not path or not name.isidentifier():
        raise GradnetError(f'--model {factory!r}: the torch framework needs '
                           'path/to/model.py:factory')
    spec = importlib.util.spec_from_file_location(
        f'gradnet_cupy_torch_model_{Path(path).stem}', path)
    if spec is None:
        raise GradnetError(f'{path}: not a Python file')
    code = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(code)
    except FileNotFoundError:
        raise GradnetError(f'{path}: no such file') from None
    except Exception as error:      # the user's code: name it, one line
        raise GradnetError(f'{path} fails to import: '
                           f'{type(error).__name__}: {error}') from None
    build = getattr(code, name, None)
    if not callable(build):
        raise GradnetError(f'{path} has no callable {name!r}')
    try:
        module = build()
    except Exception as error:
        raise GradnetError(f'{factory}() raised {type(error).__name__}: '
                           f'{error}') from None
    if not isinstance(module, torch.nn.Module):
        raise GradnetError(f'{factory} returned a {type(module).__name__}, '
                           'not a torch.nn.Module')
    try:
        state = torch.load(weights, map_location='cpu', weights_only=True)
    except OSError:
        raise
    except Exception as error:      # pickle, zip and torch errors alike
        raise GradnetError(f'{weights}: not a torch state dict file '
                           f'({type(error).__name__})') from None
    _check_state(module, state, weights)
    module.load_state_dict(state)
    if device == 'gpu' and not torch.cuda.is_available():
        raise GradnetError(f'--device gpu: torch {torch.__version__} sees no '
                           'CUDA device (a CPU build?); use --device cpu')
    return module.to('cuda' if device == 'gpu' else 'cpu')


def _check_state(module, state, weights):
    """GradnetError naming the first difference between the state dict
    ``state`` and ``module``'s own."""
    if not isinstance(state, dict):
        raise GradnetError(f'{weights} holds a {type(state).__name__}, not '
                           'a state dict (save model.state_dict())')
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} (module {tuple(own[k].shape)})'
              for k in own if k in state
              and tuple(getattr(state[k], 'shape', ())) != tuple(own[k].shape)]
    problems = [(f'{len(found)} {what}', found[0]) for what, found in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatches', shapes)) if found]
    if problems:
        raise GradnetError(
            f'{weights} does not match the module: ' + '; '.join(
                f'{what}, e.g. {first}' for what, first in problems))
