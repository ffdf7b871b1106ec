"""gradnet_cupy.kernels is the top-level kernels/ folder, mapped by setup.py's
package_dir: imported the way users do (a fresh interpreter, outside the
repository), it must come from that folder (editable install) and find its
CUDA sources through importlib.resources."""
import os
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / 'kernels'
SCRIPT = '; '.join([
    'import gradnet_cupy.kernels, gradnet_cupy.kernels.sparsify',
    'print(gradnet_cupy.kernels.__file__)',
    'import importlib.resources',
    "print(*sorted(p.name for p in importlib.resources.files("
    "'gradnet_cupy.kernels').iterdir() if p.name.endswith('.cu')))",
])


def test_kernels_import_from_the_installed_mapping(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    module_file, sources = result.stdout.splitlines()
    assert Path(module_file).resolve().parent == KERNELS
    assert sources.split() == sorted(p.name for p in KERNELS.glob('*.cu'))
