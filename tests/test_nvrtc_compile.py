"""Tier 2b: every CUDA source of gradnet_cupy.kernels compiles through
CuPy's own NVRTC path, with the options ``cupy.RawModule`` passes, for
``compute_80`` / ``compute_90`` (PTX, what ``CUPY_COMPILE_WITH_PTX=1``
asks for) and ``sm_80`` / ``sm_90`` (cubin, CuPy's default with this
NVRTC). No GPU or driver is needed: only the wheels ``cupy-cuda12x`` and
``nvidia-cuda-nvrtc-cu12`` (the test extras). Without them the tests are
skipped, and fail when CI is set.

The compile is CuPy's ``compiler.compile_using_nvrtc`` itself; the options
it receives are those ``RawModule(code, options, name_expressions)``
gives it (cupy/_core/raw.pyx -> core.compile_with_cache ->
compiler._compile_with_cache_cuda):

* ``core.assemble_cupy_compiler_options(options)`` (CuPy's own function,
  called here): CuPy's CCCL and header include folders, the CUDA include
  folder, and ``--std=c++17`` unless a standard is given (ours gives
  ``-std=c++17``, kernels/_cuda.py);
* ``-ftz=true``, added by ``_compile_with_cache_cuda``;
* inside ``compile_using_nvrtc``: the ``-arch`` option and
  ``--device-as-default-execution-space``.

The one piece that needs a device, the ``-arch`` choice
(``_get_arch_for_options_for_nvrtc``, memoized per device), is replaced by
the architecture under test. The name expressions must all lower
(``getLoweredName``), and the program log must be empty: NVRTC writes
warnings there, so any warning fails.
"""
import io

import pytest

from cuda_emulation import skip_or_fail

from gradnet_cupy.kernels._cuda import DEFAULT_OPTIONS, read_source

# the sources and the name expressions the wrappers use (as for nvcc)
from test_cuda_compile import NAME_EXPRESSIONS, SOURCES

ARCHS = ['compute_80', 'compute_90', 'sm_80', 'sm_90']


@pytest.fixture(scope='module')
def compiler():
    """CuPy's compiler module, with NVRTC found the way CuPy finds it
    (cuda.pathfinder: site-packages/nvidia/cuda_nvrtc/lib of the wheel,
    conda, the system, CUDA_PATH)."""
    reason = None
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        from cupy.cuda import compiler

        load_nvidia_dynamic_lib('nvrtc')
        compiler._get_nvrtc_version()
    except Exception as error:  # ImportError, DynamicLibNotFoundError, ...
        reason = (f'CuPy with NVRTC is not installed (pip install -e '
                  f'".[test]"): {type(error).__name__}: {error}')
    if reason:
        skip_or_fail(reason)
    return compiler


def compile_like_raw_module(compiler, monkeypatch, code, filename, arch,
                            name_expressions=()):
    """(compiled bytes, {name expression: lowered name}, program log,
    the options NVRTC received) for the CUDA source text ``code``, with the
    wrappers' options (kernels/_cuda.py DEFAULT_OPTIONS)."""
    from cupy._core import core
    from cupy_backends.cuda.libs import nvrtc

    kind, number = arch.split('_')
    monkeypatch.setattr(compiler, '_get_arch_for_options_for_nvrtc',
                        lambda arch=None: (f'-arch={kind}_{arch}',
                                           'ptx' if kind == 'compute' else 'cubin'))
    received = []
    compile_program = nvrtc.compileProgram

    def recording(program, options):
        received.append(tuple(options))
        return compile_program(program, options)

    monkeypatch.setattr(nvrtc, 'compileProgram', recording)
    log = io.StringIO()
    options = core.assemble_cupy_compiler_options(DEFAULT_OPTIONS) + ('-ftz=true',)
    compiled, mapping = compiler.compile_using_nvrtc(
        code, options, arch=number, filename=filename,
        name_expressions=list(name_expressions) or None, log_stream=log)
    return compiled, mapping or {}, log.getvalue(), received[-1]


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('source', SOURCES, ids=[p.name for p in SOURCES])
def test_source_compiles_through_cupy_nvrtc(compiler, monkeypatch, source, arch):
    expressions = NAME_EXPRESSIONS.get(source.name, ())
    compiled, mapping, log, options = compile_like_raw_module(
        compiler, monkeypatch, read_source(source.name), source.name, arch,
        expressions)
    assert not log.strip(), f'NVRTC log for {source.name} ({arch}):\n{log}'
    assert f'-arch={arch}' in options and '-ftz=true' in options
    assert '-std=c++17' in options and '--device-as-default-execution-space' in options
    assert set(mapping) == set(expressions)
    for expression, lowered in mapping.items():
        assert lowered.startswith('_Z'), (expression, lowered)
        assert lowered.encode() in compiled, (expression, lowered)
    if arch.startswith('compute'):  # PTX text: every extern "C" kernel is an entry
        ptx = compiled.decode()
        assert ptx.count('.entry') == len(expressions) + read_source(
            source.name).count('extern "C" __global__')
        assert f'.target {arch.replace("compute", "sm")}' in ptx
    else:
        assert compiled[:4] == b'\x7fELF'


def test_a_warning_fails_the_compile_check(compiler, monkeypatch):
    """An unused variable gives a log (so the empty-log check catches
    warnings), and a wrong name expression does not compile."""
    from cupy.cuda.compiler import CompileException

    code = ('extern "C" __global__ void k(float* x) { int unused = 1; x[0] = 1; }\n'
            'template <int N> __global__ void t(float* x) { x[0] = N; }\n')
    _, mapping, log, _ = compile_like_raw_module(
        compiler, monkeypatch, code, 'warn.cu', 'compute_90', ['t<3>'])
    assert 'unused' in log, log
    assert set(mapping) == {'t<3>'}
    with pytest.raises(CompileException):
        compile_like_raw_module(compiler, monkeypatch, code, 'warn.cu',
                                'compute_90', ['t<3, 4>'])
