from setuptools import find_packages, setup

setup(
    name='gradnet-cupy',
    version='0.1.0',
    description=('Tangent-space learning on Chainer/CuPy: per-sample gradient '
                 'features, GPU sparsification kernels and GradNet.'),
    long_description=open('README.rst').read(),
    long_description_content_type='text/x-rst',
    python_requires='>=3.9',
    # every subpackage of gradnet_cupy (tangent, store, metric, normalize,
    # gradnet, geodesic, ...) plus the kernels mapping below
    packages=find_packages(include=['gradnet_cupy', 'gradnet_cupy.*'])
    + ['gradnet_cupy.kernels'],
    # The top-level kernels/ folder (CUDA sources and their NumPy references)
    # IS the package gradnet_cupy.kernels: this mapping is the only place
    # that says so, so `import gradnet_cupy.kernels` needs an install (pip
    # install -e . for a checkout), not just the checkout on sys.path.
    # tests/test_kernels_import.py imports it the way users do.
    package_dir={'gradnet_cupy.kernels': 'kernels'},
    package_data={'gradnet_cupy.kernels': ['*.cu', '*.cuh', '*.h', '*.json']},
    install_requires=[
        'chainer==7.8.1',
        'numpy>=1.26',
        'scipy',
        'h5py',
        # Blosc2 HDF5 filter of the store's default compression
        'hdf5plugin',
        'click>=8',
        'tqdm',
        'threadpoolctl',
        'mlxtend',
        'matplotlib',
        'networkx',
    ],
    extras_require={
        'gpu': ['cupy-cuda12x'],
        # --mpi (docs/scaling.rst): mpi4py and an MPI library from PyPI (the
        # MPICH wheel: no system packages, runs as root); ChainerMN ships in
        # chainer. With --device gpu also nvidia-nccl-cu12 (NCCL for CuPy).
        'mpi': ['mpi4py>=4', 'mpich'],
        # cupy-cuda12x + the NVRTC wheel: tests/test_nvrtc_compile.py
        # compiles kernels/*.cu through CuPy's own NVRTC binding (no GPU or
        # driver needed); the cuBLAS wheel lets Chainer's CUDA backend import
        # (tests/test_chainer_cupy.py). See docs/kernels.rst, test tiers.
        # PyTorch models as a tangent source (docs/torch.rst); pinned: an
        # unpinned torch may pull a multi-GB CUDA build
        'torch': ['torch==2.13.0'],
        'test': ['pytest', 'hypothesis', 'anndata', 'cupy-cuda12x',
                 'nvidia-cuda-nvrtc-cu12', 'nvidia-cublas-cu12',
                 # tests/test_mpi.py: mpiexec -n 2 on the CPU
                 'mpi4py>=4', 'mpich',
                 'torch==2.13.0'],
    },
    entry_points={'console_scripts': ['gradnet-cupy = gradnet_cupy.cli:main']},
)
