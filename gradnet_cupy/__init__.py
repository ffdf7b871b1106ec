"""gradnet-cupy: tangent-space learning on Chainer/CuPy."""
__version__ = '0.1.0'
