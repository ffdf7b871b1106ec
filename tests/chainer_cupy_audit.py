"""Which ``cupy`` / ``cupyx`` names Chainer's code uses, and whether the
installed CuPy has them (used by tests/test_chainer_cupy.py; run as a script
it writes the audit as JSON)::

    python tests/chainer_cupy_audit.py bench/results/chainer-cupy-audit.json

The sources of the installed ``chainer`` and ``chainermn`` packages are
parsed with :mod:`ast` (nothing is imported but CuPy itself). A *reference*
is a dotted attribute chain (or an import) that denotes a CuPy object:

* rooted at a name bound to CuPy in that file (``import cupy``, ``import
  cupy as cp``, ``from cupy.cuda import cudnn as libcudnn``), or
* reached through a Chainer module that re-exports CuPy objects: every
  module-level name a Chainer file binds to a CuPy object (``from cupy
  import cuda`` in chainer/backends/cuda.py makes ``cuda.cuda.cudnn`` the
  chain ``cupy.cuda.cudnn``; ``cudnn = cupy.cudnn`` makes ``cuda.cudnn.X``
  ``cupy.cudnn.X``), or
* through a file-local alias ``name = <CuPy chain>``.

Each chain is resolved on the installed CuPy by ``getattr``, importing a
submodule where an attribute is missing. A chain that does not resolve must
sit behind a guard Chainer already has (read from chainer's code):

``try``
    inside the body of a ``try`` with a handler for ImportError,
    ModuleNotFoundError, AttributeError, Exception or a bare ``except``
    (e.g. the cuDNN import block of chainer/backends/cuda.py);
``flag``
    in the branch of an ``if`` (or conditional expression) taken only when
    a cuDNN flag is true: an operand of the test (or of its ``and``) names
    ``cudnn_enabled``, ``should_use_cudnn``, ``use_cudnn``,
    ``_use_cudnn``, ``_used_cudnn``, ``is_cudnn_used`` or
    ``can_use_cudnn``, all of which Chainer derives from
    ``cuda.cudnn_enabled`` (False when ``import cupy.cudnn`` failed); a
    ``not <flag>`` test guards its ``else`` branch; likewise the body of an
    ``if hasattr(...)``;
``cudnn function``
    inside a function whose name contains ``cudnn`` and whose every call
    site in the same file is itself guarded (Chainer's ``_forward_cudnn``
    pattern).

:func:`audit` returns one entry per distinct chain: where it occurs, whether
it resolves, and for each occurrence of an unresolved chain its guard or
None. Unguarded occurrences that were read and found unreachable without
cuDNN / NCCL are listed in :data:`REVIEWED` with the reason.
"""
import ast
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

ROOTS = ('cupy', 'cupyx')
PACKAGES = ('chainer', 'chainermn')
CATCHING = {'ImportError', 'ModuleNotFoundError', 'AttributeError',
            'Exception', 'BaseException'}
CUDNN_FLAGS = {'cudnn_enabled', 'should_use_cudnn', 'use_cudnn', '_use_cudnn',
               '_used_cudnn', 'is_cudnn_used', 'can_use_cudnn'}


# Unguarded uses of unresolved names, reviewed in Chainer 7.8.1's code:
# (file, enclosing scope prefix) -> why the name is unreachable here. Every
# one needs cuDNN (gone from CuPy 14) or NCCL (libnccl, not installed; not
# used by gradnet_cupy) on a code path Chainer enters by a check the audit
# cannot follow (a subclass's super() call, a constructor that checks
# availability), or is a Chainer GPU feature that needs cuDNN outright.
# tests/test_chainer_cupy.py fails on any other unguarded use, and on an
# entry here that no longer matches one.
REVIEWED = {
    ('chainer/backends/cuda.py', 'should_use_cudnn_tensor_core'):
        'a public helper Chainer itself never calls',
    ('chainer/backends/cuda.py', 'get_cudnn_dropout_states_core'):
        'cuDNN dropout states, for the cuDNN RNN only',
    ('chainer/functions/activation/clipped_relu.py', 'ClippedReLUGrad3'):
        'the cuDNN gradient class, built when should_use_cudnn',
    ('chainer/functions/pooling/pooling_2d.py', 'Pooling2D'):
        "the cuDNN forward/backward, reached by the subclasses' super() "
        'calls behind should_use_cudnn',
    ('chainer/functions/pooling/average_pooling_2d.py', 'AveragePooling2D._get_pool_mode'):
        'the cuDNN pooling mode, asked by Pooling2D.forward_gpu only',
    ('chainer/functions/rnn/n_step_rnn.py', 'BaseNStepRNN'):
        'the cuDNN RNN, built by n_step_rnn_base behind should_use_cudnn',
    ('chainer/functions/array/spatial_transformer_grid.py', 'SpatialTransformerGrid'):
        'needs cuDNN on the GPU: F.spatial_transformer_grid fails on a '
        'CuPy 14 GPU (not used by gradnet_cupy)',
    ('chainer/functions/array/spatial_transformer_sampler.py', 'SpatialTransformerSampler'):
        'needs cuDNN on the GPU: F.spatial_transformer_sampler fails on a '
        'CuPy 14 GPU (not used by gradnet_cupy)',
    ('chainer/training/updaters/multiprocess_parallel_updater.py', ''):
        'NCCL multi-GPU updater (refuses to start without cupy.cuda.nccl)',
    ('chainermn/communicators/', ''):
        'ChainerMN NCCL communicators',
}


def reviewed(occurrence):
    """The REVIEWED key covering an unguarded occurrence, or None."""
    path, _ = occurrence['where'].rsplit(':', 1)
    return next((key for key in REVIEWED if path.startswith(key[0])
                 and occurrence['scope'].startswith(key[1])), None)


def _dotted(node):
    """'a.b.c' of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return '.'.join([node.id] + parts[::-1])


def _module_name(path, site):
    parts = list(path.relative_to(site).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _is_cupy(dotted):
    return dotted.split('.')[0] in ROOTS


class _File:
    """One parsed source file: its module name, tree with parent links,
    and its bindings (local name -> 'cupy...' chain or 'chainer...'
    module)."""

    def __init__(self, path, site):
        self.path = path
        self.relpath = str(path.relative_to(site))
        self.module = _module_name(path, site)
        self.tree = ast.parse(path.read_text(encoding='utf-8'), str(path))
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                child.parent = parent
        self.bindings = {}
        self.imports = []  # (node, 'cupy...' chain) of import statements
        self._bind_imports()

    def _bind_imports(self):
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_cupy(alias.name):
                        self.imports.append((node, alias.name))
                    top = alias.name.split('.')[0]
                    if alias.asname:
                        self.bindings[alias.asname] = alias.name
                    elif top in ROOTS + PACKAGES:
                        self.bindings[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    target = f'{node.module}.{alias.name}'
                    if _is_cupy(target):
                        self.imports.append((node, target))
                    if node.module.split('.')[0] in ROOTS + PACKAGES:
                        self.bindings[alias.asname or alias.name] = target


class _Resolver:
    """Maps a dotted chain as written in a file to the CuPy chain it
    denotes (or None)."""

    def __init__(self, files):
        self.files = {f.module: f for f in files}
        self.exports = {}  # chainer module -> {name: 'cupy...'}
        for f in files:
            self.exports[f.module] = {
                name: target for name, target in f.bindings.items()
                if _is_cupy(target)}
        # module-level and local aliases `name = <cupy chain>` (two rounds:
        # an alias may be built from another module's alias)
        for _ in range(2):
            for f in files:
                for node in ast.walk(f.tree):
                    if (isinstance(node, ast.Assign) and len(node.targets) == 1
                            and isinstance(node.targets[0], ast.Name)):
                        dotted = _dotted(node.value)
                        target = dotted and self.resolve(f, dotted)
                        if target:
                            f.bindings[node.targets[0].id] = target
                            if isinstance(node.parent, (ast.Module, ast.If, ast.Try)):
                                self.exports[f.module][node.targets[0].id] = target

    def resolve(self, f, dotted):
        head, *rest = dotted.split('.')
        current = f.bindings.get(head)
        if current is None:
            return None
        for segment in rest:
            if _is_cupy(current):
                current = f'{current}.{segment}'
            elif f'{current}.{segment}' in self.files:
                current = f'{current}.{segment}'
            elif segment in self.exports.get(current, {}):
                current = self.exports[current][segment]
            else:
                return None
        return current if _is_cupy(current) else None


def resolves(chain):
    """True when the dotted ``chain`` ('cupy.cuda.cudnn') names an object of
    the installed CuPy (attributes, importing submodules as needed)."""
    parts = chain.split('.')
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return False
    for i, part in enumerate(parts[1:], 1):
        if not hasattr(obj, part):
            try:
                importlib.import_module('.'.join(parts[:i + 1]))
            except Exception:
                return False
        try:
            obj = getattr(obj, part)
        except Exception:
            return False
    return True


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _flag_branch(test):
    """'body' when the test's truth implies a cuDNN flag (or a
    ``hasattr``), 'orelse' when its falsity does, else None."""
    if isinstance(test, ast.Call) and _dotted(test.func) == 'hasattr':
        return 'body'
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return 'orelse' if _flag_branch(test.operand) == 'body' else None
    operands = test.values if (isinstance(test, ast.BoolOp)
                               and isinstance(test.op, ast.And)) else [test]
    for operand in operands:
        if not isinstance(operand, (ast.UnaryOp, ast.BoolOp)) and \
                _names(operand) & CUDNN_FLAGS:
            return 'body'
    return None


def _catches(handler):
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(_dotted(t) in CATCHING for t in types)


def _in(node, nodes):
    return any(node is n for n in nodes)


def _guard(node, calls_guarded, seen=()):
    """The guard of ``node`` ('try at line N', 'cudnn flag at line N',
    'cudnn function NAME'), or None. ``calls_guarded(name, seen)``: whether
    every call of the function or class ``name`` is guarded."""
    child = node
    parent = getattr(node, 'parent', None)
    while parent is not None:
        if isinstance(parent, ast.Try) and _in(child, parent.body) and \
                any(_catches(h) for h in parent.handlers):
            return f'try at line {parent.lineno}'
        if isinstance(parent, (ast.If, ast.IfExp)):
            branch = _flag_branch(parent.test)
            inside = parent.body if isinstance(parent, ast.If) else [parent.body]
            other = parent.orelse if isinstance(parent, ast.If) else [parent.orelse]
            if (branch == 'body' and _in(child, inside)) or \
                    (branch == 'orelse' and _in(child, other)):
                return f'flag at line {parent.lineno}'
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and 'cudnn' in parent.name.lower() and parent.name not in seen \
                and calls_guarded(parent.name, seen + (parent.name,)):
            return f'cudnn function {parent.name}'
        child, parent = parent, getattr(parent, 'parent', None)
    return None


def _call_checker(files):
    """``calls_guarded(name, seen)`` for :func:`_guard`: ``name`` is
    called somewhere in ``files`` and every call is guarded."""
    calls = {}
    for f in files:
        for n in ast.walk(f.tree):
            if isinstance(n, ast.Call):
                name = (n.func.id if isinstance(n.func, ast.Name) else
                        n.func.attr if isinstance(n.func, ast.Attribute) else None)
                calls.setdefault(name, []).append(n)

    def calls_guarded(name, seen):
        return bool(calls.get(name)) and all(
            _guard(c, calls_guarded, seen) for c in calls[name])

    return calls_guarded


def _scope(node):
    """'Class.method' of the functions and classes around ``node`` ('' at
    module level)."""
    names = []
    node = getattr(node, 'parent', None)
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        node = getattr(node, 'parent', None)
    return '.'.join(names[::-1])


def _chain_nodes(tree):
    """The outermost Name/Attribute chains of ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and \
                isinstance(node.ctx, ast.Load) and _dotted(node) and \
                not isinstance(getattr(node, 'parent', None), ast.Attribute):
            yield node


def source_files(site=None):
    """The .py files of chainer and chainermn under ``site`` (default: the
    site-packages folder holding the installed chainer)."""
    if site is None:  # found without importing chainer
        site = Path(importlib.util.find_spec('chainer').origin).resolve().parents[1]
    site = Path(site)
    return site, sorted(p for package in PACKAGES if (site / package).is_dir()
                        for p in (site / package).rglob('*.py'))


def audit(site=None):
    """[{'name', 'resolves', 'occurrences': [{'where', 'scope', 'guard'}]}]
    sorted by name: 'where' is 'file:line' (relative to site-packages),
    'scope' the enclosing 'Class.function', 'guard' (unresolved names only)
    the guard found or None."""
    site, paths = source_files(site)
    files = [_File(p, site) for p in paths]
    resolver = _Resolver(files)
    found = {}
    for f in files:
        refs = [(node, chain) for node, chain in f.imports]
        refs += [(node, resolver.resolve(f, _dotted(node)))
                 for node in _chain_nodes(f.tree)]
        for node, chain in refs:
            if chain:
                found.setdefault(chain, []).append((f, node))
    calls_guarded = _call_checker(files)
    entries = []
    for name in sorted(found):
        ok = resolves(name)
        entries.append({'name': name, 'resolves': ok, 'occurrences': [
            {'where': f'{f.relpath}:{node.lineno}', 'scope': _scope(node),
             **({} if ok else {'guard': _guard(node, calls_guarded)})}
            for f, node in found[name]]})
    return entries


def unguarded(entries):
    """The unresolved, unguarded occurrences: [(name, occurrence)]."""
    return [(e['name'], o) for e in entries if not e['resolves']
            for o in e['occurrences'] if o['guard'] is None]


def summary(entries):
    """Text listing of the audit: every name, ok / guarded / UNGUARDED."""
    lines = []
    for e in entries:
        if e['resolves']:
            lines.append(f"ok        {e['name']}")
            continue
        for o in e['occurrences']:
            status = 'guarded' if o['guard'] else 'UNGUARDED'
            lines.append(f"{status:9} {e['name']}  {o['where']} "
                         f"({o['scope'] or 'module'})  {o['guard'] or ''}")
    return '\n'.join(lines)


def main(argv):
    """Writes the audit to argv[0] as JSON (atomically) and prints the
    summary; exit status 1 when an unguarded occurrence is not in
    REVIEWED."""
    import cupy

    entries = audit()
    out = Path(argv[0])
    partial = out.with_name(out.name + '.partial')
    partial.write_text(json.dumps({
        'chainer': importlib.metadata.version('chainer'), 'cupy': cupy.__version__,
        'names': len(entries),
        'unresolved': sorted(e['name'] for e in entries if not e['resolves']),
        'unguarded': [{'name': name, **o, 'reviewed': REVIEWED.get(reviewed(o))}
                      for name, o in unguarded(entries)],
        'entries': entries}, indent=1) + '\n')
    partial.replace(out)
    print(summary(entries))
    return 1 if any(reviewed(o) is None for _, o in unguarded(entries)) else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
