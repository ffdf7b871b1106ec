"""The ``gradnet-cupy`` command line."""
import click

from gradnet_cupy import __version__


@click.group()
@click.version_option(__version__)
def main():
    """Tangent-space learning on Chainer/CuPy."""
