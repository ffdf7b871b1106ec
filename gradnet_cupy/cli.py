"""The ``gradnet-cupy`` command line.

Every command takes the shared options of :func:`common_options`
(``--device auto|cpu|gpu``, ``--seed``, ``--json``). Bad input
(:class:`GradnetError`) and usage errors end the command with a one-line
``error: ...`` on stderr and exit status 1 (2 for usage errors), never a
traceback. With ``--json`` a command prints exactly one JSON line on stdout.
"""
import functools
import json
import sys
import tempfile

import click

from gradnet_cupy import __version__
from gradnet_cupy.backend import DEVICES, resolve_device
from gradnet_cupy.data import DATASETS, load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.models import MODELS
from gradnet_cupy.train_base import OPTIMIZERS, train_base


# click >= 8.2 raises this for a bare group call; older click exits itself.
_NO_ARGS_IS_HELP = getattr(click.exceptions, 'NoArgsIsHelpError', ())


class Group(click.Group):
    """A click group that reports errors as one line ``error: ...``."""

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        try:
            status = super().main(args, prog_name, complete_var,
                                  standalone_mode=False, **extra)
        except GradnetError as e:
            _fail(str(e), 1)
        except _NO_ARGS_IS_HELP as e:      # bare ``gradnet-cupy``: the help
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            _fail(f'{e.format_message()} (see --help)', e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail('aborted', 1)
        if not standalone_mode:
            return status
        sys.exit(status if isinstance(status, int) else 0)


def _fail(message, code):
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def common_options(command):
    """Add ``--device``, ``--seed`` and ``--json`` to a command.

    The command receives ``device`` already resolved to 'cpu' or 'gpu'
    (:func:`backend.resolve_device`), ``seed`` (int) and ``as_json`` (bool).
    """
    @click.option('--device', type=click.Choice(DEVICES), default='auto',
                  show_default=True,
                  help='auto: the GPU when CuPy sees one, else the CPU.')
    @click.option('--seed', type=int, default=0, show_default=True,
                  help='Seed of initial weights, shuffling and augmentation.')
    @click.option('--json', 'as_json', is_flag=True,
                  help='Print one JSON summary line on stdout.')
    @functools.wraps(command)
    def wrapper(device, **kwargs):
        return command(device=resolve_device(device), **kwargs)
    return wrapper


def report(as_json, summary, line):
    """Print ``summary`` as one JSON line (``as_json``) or ``line``."""
    click.echo(json.dumps(summary) if as_json else line)


@click.group(cls=Group)
@click.version_option(__version__)
def main():
    """Tangent-space learning on Chainer/CuPy."""


@main.command('train-base')
@click.option('--dataset', type=click.Choice(DATASETS), default='mnist',
              show_default=True)
@click.option('--data-dir', default=None,
              help="Dataset folder, or 'download' for Chainer's downloader. "
                   'Default: the embedded 5,000 MNIST digits (mnist), '
                   '/usr/share/datasets/fashion-mnist (fashion-mnist).')
@click.option('--model', type=click.Choice(list(MODELS)), default='cnn',
              show_default=True)
@click.option('--epochs', type=int, default=10, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--lr', type=float, default=0.01, show_default=True)
@click.option('--momentum', type=float, default=0.9, show_default=True,
              help='Momentum of --optimizer momentum.')
@click.option('--weight-decay', type=float, default=0.0, show_default=True)
@click.option('--optimizer', type=click.Choice(OPTIMIZERS),
              default='momentum', show_default=True)
@click.option('--stop-at-accuracy', type=float, default=None,
              help='Stop after the first epoch whose test accuracy reaches '
                   'this (for weakly trained bases).')
@click.option('--subset', type=int, default=None,
              help='Keep only the first N samples of every split.')
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for snapshots, snapshots.json and base.json.')
@click.option('--overwrite', is_flag=True,
              help='Replace a previous run in --out.')
@common_options
def train_base_command(dataset, data_dir, model, subset, device, seed,
                       as_json, **settings):
    """Train a base network on the base half of a dataset.

    Writes <out>/snapshot_epoch_<k>.npz after every epoch and
    <out>/snapshots.json (epoch, train loss, test accuracy, path).
    """
    data = load_dataset(dataset, data_dir, subset)
    summary = train_base(data, model, seed=seed, device=device,
                         data_dir=data_dir, subset=subset, **settings)
    report(as_json, summary,
           f"test accuracy {summary['test_accuracy']:.4f} after "
           f"{summary['epochs_run']} epoch(s) ({dataset} {model}, "
           f"{len(data.test[1])} test images); snapshots in {summary['out']}")


@main.command()
@click.option('--epochs', type=int, default=2, show_default=True)
@click.option('--out', default=None, type=click.Path(file_okay=False),
              help='Keep the snapshots here (default: a temporary folder).')
@common_options
def demo(epochs, out, device, seed, as_json):
    """Run the pipeline on the embedded MNIST (5,000 digits, CPU minutes).

    For now: trains the base CNN on the 2,000 base digits and prints its
    accuracy on the 1,000 test digits.
    """
    data = load_dataset('mnist')
    with tempfile.TemporaryDirectory(prefix='gradnet-demo-') as tmp:
        summary = train_base(data, 'cnn', out or tmp, epochs=epochs,
                             seed=seed, device=device, overwrite=True)
    report(as_json, {'base_test_accuracy': summary['test_accuracy'],
                     'epochs': summary['epochs_run'], 'device': device},
           f"demo: base CNN on the embedded MNIST ({len(data.base[1])} "
           f"training / {len(data.test[1])} test digits), "
           f"{summary['epochs_run']} epochs: test accuracy "
           f"{summary['test_accuracy']:.4f}")
