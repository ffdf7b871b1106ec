"""The ``gradnet-cupy`` command line.

Every command takes the shared options of :func:`common_options`
(``--device auto|cpu|gpu``, ``--seed``, ``--json``). Options are checked
here, by click types and ranges, before any work. Bad input
(:class:`GradnetError`), usage errors and operating-system errors (disk
full, permission denied: one line naming the path and the cause) end the
command with a one-line ``error: ...`` on stderr and exit status 1 (2 for
usage errors), never a traceback. With ``--json`` a command prints exactly
one JSON line on stdout.
"""
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import sys
import tempfile

import click
import numpy as np
from click.core import ParameterSource

from gradnet_cupy import __version__, gradnet, scaleout
from gradnet_cupy.backend import DEVICES, resolve_device
from gradnet_cupy.data import DATASETS, load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import (
    FRAMEWORKS, SPLITS, extract_to_store, model_provenance, parse_shard,
    torch_extraction)
from gradnet_cupy.models import MODELS, build_model, model_to_device
from gradnet_cupy.metric import (DEFAULT_MAX_BLOCK, DEFAULT_PARTITION,
                                 PARTITIONS)
from gradnet_cupy.normalize import NORMALIZATIONS, normalizer_class
from gradnet_cupy.rbm.commands import COMMANDS as RBM_COMMANDS, \
    FISHER_SCALINGS, rbm_extraction
from gradnet_cupy.rbm.fisher import OBJECTIVES, check_objective_for
from gradnet_cupy.options import (
    MetricOptions, NetOptions, NormalizeOptions, TrainOptions)
from gradnet_cupy.store import (
    COMPRESSIONS, DEFAULT_COMPRESSION, TangentStore, merge as merge_stores)
from gradnet_cupy.tangent import CANDIDATE_MODES, parameter_layout
from gradnet_cupy.train_base import (
    BASE_OPTIMIZERS, load_base, load_snapshot, train_base)


MPI_HELP = {
    'extract': 'Run as one of the ranks of `mpiexec -n N`: rank r extracts '
               'shard r/N (on its node\'s GPU r with --device gpu), rank 0 '
               'merges them into --out. Needs pip install '
               '"gradnet-cupy[mpi]".',
    'fit': 'Run as one of the ranks of `mpiexec -n N`: data-parallel '
           'training (ChainerMN), each rank takes --batch rows of every '
           'global batch of N x --batch; rank 0 writes --out. Needs pip '
           'install "gradnet-cupy[mpi]".'}

# tangent's CANDIDATE_MODES in the order --candidates has always listed them
CANDIDATE_CHOICES = sorted(CANDIDATE_MODES,
                           key=('random', 'all', 'true').index)



class FiniteRange(click.FloatRange):
    """A click float range that also refuses NaN and infinity."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f'{number} is not a finite number', param, ctx)
        return number


# the ranges of numeric options, checked by click before any work
POSITIVE = click.IntRange(min=1)
PERCENTILE = FiniteRange(0, 100, min_open=True, max_open=True)
RATE = FiniteRange(0, min_open=True)
FRACTION = FiniteRange(0, 1, max_open=True)
NON_NEGATIVE = FiniteRange(0)

# click >= 8.2 raises this for a bare group call; older click exits itself.
_NO_ARGS_IS_HELP = getattr(click.exceptions, 'NoArgsIsHelpError', ())


class Group(click.Group):
    """A click group that reports errors as one line ``error: ...``.

    Commands that live in other packages and build on this module's shared
    options (``gradnet_cupy.geodesic.cli``, ``gradnet_cupy.edges.cli``) are
    named in :attr:`LAZY` and imported when first asked for: they import
    this module, so importing them here at load time would be circular.
    """
    LAZY = {'sparsify-path': 'gradnet_cupy.geodesic.cli',
            'task-path': 'gradnet_cupy.geodesic.cli',
            'edges': 'gradnet_cupy.edges.cli',
            'metric-size': 'gradnet_cupy.edges.cli'}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self.LAZY:
            module = importlib.import_module(self.LAZY[name])
            command = {c.name: c for c in module.COMMANDS}[name]
        return command

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        try:
            status = super().main(args, prog_name, complete_var,
                                  standalone_mode=False, **extra)
        except GradnetError as e:
            _fail(str(e), 1)
        except OSError as e:
            _fail(os_error_line(e), 1)
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


def os_error_line(error):
    """One line for an OSError: the path(s) and the cause."""
    paths = ' -> '.join(str(p) for p in (error.filename, error.filename2)
                        if p is not None)
    cause = error.strerror or str(error)
    return f'{paths}: {cause}' if paths else cause


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
    @click.option('--seed', type=click.IntRange(0, 2**32 - 1), default=0,
                  show_default=True,
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


def option_group(*options):
    """One decorator applying several click options, in the given order."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


dataset_options = option_group(
    click.option('--dataset', type=click.Choice(DATASETS), default='mnist',
                 show_default=True),
    click.option('--data-dir', default=None,
                 help="Dataset folder, or 'download' for Chainer's "
                      'downloader. Default: the embedded 5,000 MNIST digits '
                      '(mnist), /usr/share/datasets/fashion-mnist.'),
    click.option('--subset', type=POSITIVE, default=None,
                 help='Keep only the first N samples of every split.'))

metric_block_options = option_group(
    click.option('--metric-partition', type=click.Choice(PARTITIONS),
                 default=DEFAULT_PARTITION, show_default=True,
                 help='Blocks of --normalize metric: one per output unit '
                      '(fan-in), per layer, or per column.'),
    click.option('--metric-max-block', type=click.IntRange(min=0),
                 default=DEFAULT_MAX_BLOCK, show_default=True,
                 help='Cut longer metric blocks into pieces (0: no cap).'))

class ModelSpec(click.Path):
    """An existing file, or ``path:factory`` whose path is an existing file
    (``extract --framework torch``)."""

    def __init__(self):
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        path, colon, name = str(value).rpartition(':')
        if colon and name.isidentifier() and not os.path.exists(value):
            return f'{super().convert(path, param, ctx)}:{name}'
        return super().convert(value, param, ctx)


def base_model_options(command, model_type=click.Path(exists=True,
                                                      dir_okay=False),
                       model_help='Base network snapshot (train-base writes '
                                  'them).'):
    """``--model`` (the snapshot), ``--arch`` and ``--q``."""
    return option_group(
        click.option('--model', 'snapshot', required=True, type=model_type,
                     help=model_help),
        click.option('--arch', type=click.Choice(list(MODELS) + ['rbm']),
                     default='cnn', show_default=True,
                     help='Architecture of the snapshot (rbm: train-rbm).'),
        click.option('--q', type=PERCENTILE, default=85.0,
                     show_default=True,
                     help='Per-layer sparsification percentile, in (0, '
                          '100).'))(command)


@click.group(cls=Group)
@click.version_option(__version__)
def main():
    """Tangent-space learning on Chainer/CuPy."""


@main.command('train-base')
@dataset_options
@click.option('--model', type=click.Choice(list(MODELS)), default='cnn',
              show_default=True)
@click.option('--epochs', type=POSITIVE, default=10, show_default=True)
@click.option('--batch', type=POSITIVE, default=32, show_default=True)
@click.option('--lr', type=RATE, default=0.01, show_default=True)
@click.option('--momentum', type=FRACTION, default=0.9, show_default=True,
              help='Momentum of --optimizer momentum.')
@click.option('--weight-decay', type=NON_NEGATIVE, default=0.0,
              show_default=True)
@click.option('--optimizer', type=click.Choice(BASE_OPTIMIZERS),
              default='momentum', show_default=True)
@click.option('--stop-at-accuracy', type=FiniteRange(0, 1),
              default=None,
              help='Stop after the first epoch whose test accuracy reaches '
                   'this (for weakly trained bases).')
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


def load_base_model(snapshot, arch, data, device):
    """The base network of ``arch`` for ``data`` with ``snapshot`` loaded,
    on ``device``, and its default parameter layout."""
    model = load_snapshot(build_model(arch, data.in_shape, data.n_classes),
                          snapshot)
    model = model_to_device(model, device)
    return model, parameter_layout(model)


def online_test_source(snapshot, arch, dataset, data_dir, subset, device):
    """The :class:`~gradnet_cupy.gradnet.OnlineTest` of a snapshot: the test
    split's tangents extracted on the fly, never written."""
    data = load_dataset(dataset, data_dir, subset)
    base, layout = load_base_model(snapshot, arch, data, device)
    return gradnet.OnlineTest(base, layout, data, gradnet.online_identity(
        snapshot, arch, dataset, data.n_classes, layout))


@main.command()
@functools.partial(
    base_model_options, model_type=ModelSpec(),
    model_help='Base network snapshot (train-base writes them); with '
               '--framework torch: path/to/model.py:factory, a function of '
               'no arguments returning the torch.nn.Module.')
@click.option('--framework', type=click.Choice(FRAMEWORKS),
              default='chainer', show_default=True,
              help='torch: a PyTorch model (--model path.py:factory, '
                   '--weights state dict; pip install '
                   '"gradnet-cupy[torch]"), docs/torch.rst.')
@click.option('--weights', type=click.Path(exists=True, dir_okay=False),
              default=None,
              help='With --framework torch: the state dict file '
                   '(torch.save(model.state_dict(), path)).')
@dataset_options
@click.option('--split', type=click.Choice(SPLITS), default='gradnet',
              show_default=True)
@click.option('--candidates', type=click.Choice(CANDIDATE_CHOICES),
              default='random', show_default=True,
              help='random: one uniform candidate per sample (training '
                   'data); all: one row per class (test data); true: the '
                   'label.')
@click.option('--out', required=True, type=click.Path(dir_okay=False),
              help='The HDF5 store to write (resumed if a run was killed).')
@click.option('--shard', default=None,
              help='i/n: extract only the i-th of n disjoint slices.')
@click.option('--batch', type=POSITIVE, default=64, show_default=True,
              help='Samples per tangent computation (recorded: a resume '
                   'must use the same).')
@click.option('--compression', type=click.Choice(COMPRESSIONS),
              default=DEFAULT_COMPRESSION, show_default=True,
              help='blosc2-zstd: fast to read, about gzip\'s size (h5py '
                   'users: import hdf5plugin); blosc2-lz4: faster still, '
                   'larger; gzip: any HDF5 reader; lzf: h5py\'s own; '
                   'none: twice the size.')
@click.option('--normalize', type=click.Choice(['none', 'metric']),
              default='none', show_default=True,
              help='metric: also accumulate the block metric G of the '
                   'extracted rows on the extraction device, saved beside '
                   'the store (train.h5 -> train.metric.h5); fit '
                   '--normalize metric with this store as --train then '
                   'skips its own pass over the store.')
@metric_block_options
@click.option('--objective', type=click.Choice(list(OBJECTIVES)),
              default='cross-entropy', show_default=True,
              help='Per-sample objective differentiated: cross-entropy of a '
                   'candidate label (classifiers) or free-energy (--arch '
                   'rbm: centred Fisher scores, one row per sample).')
@click.option('--binarize', 'threshold', type=float, default=None,
              help='With --arch rbm: visible unit = 1 where the image value '
                   'exceeds this.')
@click.option('--fisher-scaling', type=click.Choice(FISHER_SCALINGS),
              default='none', show_default=True,
              help='With --arch rbm: diagonal: scale the centred scores by '
                   'the diagonal Fisher information fitted on the gradnet '
                   'split (the training rows) before sparsifying; use the '
                   'same for every store of a fit.')
@click.option('--mpi', is_flag=True, help=MPI_HELP['extract'])
@common_options
def extract(snapshot, arch, q, framework, weights, dataset, data_dir, subset,
            split, candidates, out, shard, batch, compression, normalize,
            metric_partition, metric_max_block, objective, threshold,
            fisher_scaling, mpi, device, seed, as_json):
    """Extract sparse tangent features of one split into an HDF5 store.

    Re-running the same command after a crash resumes where the last
    complete batch ended; a store of a different extraction is refused.
    """
    check_framework_options(framework, snapshot, weights, objective)
    if fisher_scaling != 'none' and arch != 'rbm':
        raise GradnetError('--fisher-scaling needs --arch rbm')
    if mpi and (shard is not None or normalize != 'none'):
        raise GradnetError('--mpi picks the shard of each rank itself and '
                           'accumulates no metric: drop --shard and '
                           '--normalize metric')
    parallel = scaleout.start(mpi, device, click.get_current_context().params)
    options = NormalizeOptions(normalize, metric=MetricOptions(
        metric_partition, metric_max_block))
    data = load_dataset(dataset, data_dir, subset)
    transform, features_map = data.eval_transform, None
    if framework == 'torch':
        model, provenance = torch_extraction(
            snapshot, weights, device, dataset, split, data_dir, subset)
        layout = model.layout
    else:
        provenance = model_provenance(snapshot, arch, dataset, split,
                                      data_dir, subset)
        if arch == 'rbm':
            model, layout, transform, features_map = rbm_extraction(
                snapshot, data, device, threshold, seed, fisher_scaling)
            provenance['fisher_scaling'] = fisher_scaling
        else:
            model, layout = load_base_model(snapshot, arch, data, device)
        check_objective_for(model, OBJECTIVES[objective])
    metric = normalizer_class(normalize).extraction_accumulator(
        layout, options, device)

    def run(path, shard):
        return extract_to_store(
            model, layout, getattr(data, split), data.n_classes, path,
            provenance, candidates=candidates, q=q, shard=shard, seed=seed,
            device=device, transform=transform, batch=batch,
            progress=not as_json and parallel.is_root,
            compression=compression, metric=metric,
            objective=OBJECTIVES[objective], features_map=features_map)
    summary = scaleout.extract_ranks(parallel, out, run) if mpi else \
        run(out, parse_shard(shard))
    if not parallel.is_root:
        return
    report(as_json, summary,
           f"{summary['rows']} rows x {summary['n_columns']} columns, "
           f"density {summary['density']:.4f}, in {summary['path']}"
           + (f"; metric in {summary['metric']}" if metric else ''))


def check_framework_options(framework, snapshot, weights, objective):
    """UsageError for extract options that do not fit ``framework``."""
    ctx = click.get_current_context()
    if framework == 'chainer':
        if weights is not None:
            raise click.UsageError('--weights is for --framework torch')
        if not os.path.isfile(snapshot):
            raise click.UsageError(f'--model {snapshot!r}: path:factory is '
                                   'for --framework torch')
        return
    if weights is None:
        raise click.UsageError('--framework torch needs --weights (the '
                               'state dict file)')
    for name, option in (('arch', '--arch'), ('threshold', '--binarize')):
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f'{option} is for --framework chainer')
    if objective != 'cross-entropy':
        raise click.UsageError('--framework torch takes the cross-entropy '
                               'objective only')


@main.command()
@click.argument('shards', nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option('--out', required=True, type=click.Path(dir_okay=False))
@common_options
def merge(shards, out, device, seed, as_json):
    """Join the completed shards of one extraction into one store."""
    merge_stores(list(shards), out)
    with TangentStore.open(out) as store:
        summary = {'path': out, 'rows': len(store), 'nnz': store.nnz}
    report(as_json, summary, f"{summary['rows']} rows merged into {out}")


def parse_hidden(text):
    if text is None:
        return None
    try:
        return [int(h) for h in text.split(',')]
    except ValueError:
        raise GradnetError(f'--hidden {text!r} is not a comma-separated list '
                           'of integers') from None


@main.command()
@click.option('--train', 'train_path', type=click.Path(exists=True),
              help='Training store (extract --split gradnet).')
@click.option('--test', 'test_path', type=click.Path(exists=True),
              help='Test store (extract --split test --candidates all).')
@click.option('--online', is_flag=True,
              help='Algorithm 1: extract each batch on the fly (augmented, '
                   'new random candidates), no store. Needs --model.')
@click.option('--online-test', is_flag=True,
              help='With --train: score the test split without a test '
                   'store, its tangents (all candidates) extracted batch by '
                   'batch and never written. Needs --model (the training '
                   "store's snapshot), --arch and --dataset.")
@click.option('--model', 'snapshot', type=click.Path(exists=True,
                                                     dir_okay=False),
              help='Base snapshot, with --online or --online-test.')
@click.option('--arch', type=click.Choice(list(MODELS)), default='cnn',
              show_default=True, help='With --online or --online-test.')
@click.option('--q', type=PERCENTILE, default=85.0, show_default=True,
              help='With --online.')
@dataset_options
@click.option('--normalize', type=click.Choice(NORMALIZATIONS),
              default='scale_power', show_default=True,
              help='metric: block-diagonal G^-1/2 whitening fitted on the '
                   'training features, re-sparsified at their q.')
@click.option('--power', type=FiniteRange(0, min_open=True),
              default=0.5, show_default=True,
              help='Exponent of --normalize power.')
@click.option('--normalize-store', type=click.Path(dir_okay=False),
              default=None,
              help='Fit the normalization on this store\'s rows instead of '
                   '--train\'s: a held-out validation split of the same '
                   'snapshot and q (e.g. extract --shard 0/2 for --train, '
                   '--shard 1/2 for this).')
@metric_block_options
@click.option('--metric-damping', type=NON_NEGATIVE, default=1e-3,
              show_default=True,
              help='Metric damping, relative to each block\'s mean '
                   'diagonal.')
@click.option('--hidden', default=None,
              help='Hidden units per block, e.g. 5,100,25; 0: no hidden '
                   'layer (a linear classifier, logistic regression).')
@click.option('--hidden-total', type=POSITIVE, default=130,
              show_default=True,
              help='Without --hidden: this many units in proportion to the '
                   'block sizes.')
@click.option('--wiring', type=click.Choice(gradnet.WIRINGS),
              default='diagonal', show_default=True)
@click.option('--dropout', type=FiniteRange(0, 1, max_open=True),
              default=0.0, show_default=True)
@click.option('--batchnorm', is_flag=True)
@click.option('--optimizer', type=click.Choice(gradnet.GRADNET_OPTIMIZERS),
              default='sgd', show_default=True)
@click.option('--lr', type=RATE, default=0.01, show_default=True)
@click.option('--momentum', type=FRACTION, default=0.9, show_default=True)
@click.option('--weight-decay', type=NON_NEGATIVE, default=0.0,
              show_default=True)
@click.option('--batch', type=POSITIVE, default=25, show_default=True)
@click.option('--epochs', type=POSITIVE, default=10, show_default=True)
@click.option('--eval-every', type=click.IntRange(min=0), default=None,
              help='Evaluate every N iterations (default: every epoch; 0: '
                   'only at the end).')
@click.option('--out', required=True, type=click.Path(file_okay=False),
              help='Folder for gradnet.npz, normalizer.npz (metric.h5 '
                   'with --normalize metric), gradnet.json (settings and '
                   'metrics) and learning_curve.png; written as '
                   '<out>.partial, with a checkpoint after every epoch, and '
                   'renamed when complete.')
@click.option('--overwrite', is_flag=True,
              help='Start anew, replacing a fit in --out (or an interrupted '
                   'one in <out>.partial) made with other arguments.')
@click.option('--mpi', is_flag=True, help=MPI_HELP['fit'])
@common_options
def fit(train_path, test_path, online, online_test, snapshot, arch, q,
        dataset, data_dir, subset, normalize, power, normalize_store,
        metric_partition, metric_max_block, metric_damping, hidden,
        hidden_total, wiring, dropout,
        batchnorm, optimizer, lr, momentum, weight_decay, batch, epochs,
        eval_every, out, overwrite, mpi, device, seed, as_json):
    """Train GradNet on tangent features and evaluate it (all candidates).

    A fit killed midway resumes from its last completed epoch when the same
    command is run again (bit for bit the weights of an uninterrupted run);
    a rerun of a finished fit only prints its summary.
    """
    if mpi and (online or online_test):
        raise GradnetError('--mpi trains and tests on stores: drop '
                           f"--{'online' if online else 'online-test'}")
    parallel = scaleout.start(mpi, device, click.get_current_context().params,
                              gradients=True)
    net = NetOptions(parse_hidden(hidden), hidden_total, wiring, dropout,
                     batchnorm, seed)
    training = TrainOptions(optimizer, lr, momentum, weight_decay, batch,
                            epochs, eval_every, seed)
    normalization = NormalizeOptions(normalize, power, MetricOptions(
        metric_partition, metric_max_block, metric_damping), normalize_store)
    if (online or online_test) and snapshot is None:
        raise GradnetError(f"--{'online' if online else 'online-test'} "
                           'needs --model SNAPSHOT')
    test = None if not (online or online_test) else online_test_source(
        snapshot, arch, dataset, data_dir, subset, device)
    if online:
        source = {'online': True, 'model': snapshot, 'arch': arch,
                  'dataset': dataset, 'subset': subset, 'q': q,
                  'snapshot': dict(test.identity, q=q)}
    else:
        if train_path is None or (test_path is None) == (not online_test):
            raise GradnetError(
                'fit needs --train and one of --test STORE or --online-test '
                '--model SNAPSHOT (or --online --model SNAPSHOT)')
        source = {'train': train_path}
        if online_test:
            source['online_test'] = {'model': snapshot, 'arch': arch,
                                     'dataset': dataset, 'subset': subset}
        else:
            source['test'] = test_path
        if normalize_store is not None:
            source['normalize_store'] = normalize_store
        for name in ('train', 'test', 'normalize_store'):
            if name not in source:
                continue
            with TangentStore.open(source[name]) as store:
                source[f'{name}_created'] = store.provenance.get('created')
                if name == 'train':
                    source['snapshot'] = gradnet.snapshot_identity(store)
    settings = {**source, 'normalize': normalize, 'power': power,
                **dataclasses.asdict(net), **dataclasses.asdict(training),
                **normalizer_class(normalize).extra_settings(normalization),
                'device': device}
    if parallel.size > 1:     # N ranks x --batch: another fit than 1 x batch
        settings['mpi_ranks'] = parallel.size
    folder = scaleout.gather_errors(parallel, lambda: gradnet.FitFolder(
        out, settings, overwrite) if parallel.is_root else None)
    done = parallel.bcast(folder and folder.done)
    if done is not None:
        summary = done['summary']
    else:
        if online:
            model, normalizer, history = gradnet.fit_online(
                test.base, test.layout, test.data, q, normalization, net,
                training, device, progress=not as_json, folder=folder)
        else:
            model, normalizer, history = gradnet.fit_stores(
                train_path, test_path, normalization, net, training, device,
                progress=not as_json and parallel.is_root, folder=folder,
                online_test=test, parallel=parallel)
        if not parallel.is_root:
            return
        summary = gradnet.save_fit(folder, model, normalizer, history)
    if not parallel.is_root:
        return
    report(as_json, summary,
           f"GradNet test accuracy {summary['test_accuracy']:.4f} "
           f"(hidden {','.join(map(str, summary['hidden_sizes']))}); saved "
           f"in {out}")


@main.command()
@click.option('--gradnet', 'folder', required=True,
              type=click.Path(exists=True, file_okay=False),
              help='Folder written by fit.')
@click.option('--test', 'test_path',
              type=click.Path(exists=True, dir_okay=False),
              help='Test store with all candidates.')
@click.option('--online-test', is_flag=True,
              help='Instead of --test: extract the test split on the fly '
                   '(all candidates, never written). Needs --model, --arch '
                   'and --dataset of the fit.')
@click.option('--model', 'snapshot', type=click.Path(exists=True,
                                                     dir_okay=False),
              help='With --online-test: the base snapshot of the fit.')
@click.option('--arch', type=click.Choice(list(MODELS)), default='cnn',
              show_default=True, help='With --online-test.')
@dataset_options
@common_options
def evaluate(folder, test_path, online_test, snapshot, arch, dataset,
             data_dir, subset, device, seed, as_json):
    """Accuracy and confusion matrix of a saved GradNet on a test store.

    The test store must hold all candidates and come from the snapshot and
    layout the GradNet was trained on (--online-test: the same is checked
    of --model, --arch and --dataset)."""
    if (test_path is None) == (not online_test) or (
            online_test and snapshot is None):
        raise GradnetError('evaluate needs --test STORE or --online-test '
                           '--model SNAPSHOT')
    model, normalizer, info = gradnet.load_gradnet(folder, device)
    model = model_to_device(model, device)
    identity = info.get('settings', {}).get('snapshot')
    if identity is None:
        raise GradnetError(f'{folder}: the fit does not record its '
                           'snapshot and layout (fit it again)')
    with contextlib.ExitStack() as stack:
        if online_test:
            test = online_test_source(snapshot, arch, dataset, data_dir,
                                      subset, device)
            test.check(identity)
            batches = gradnet.online_test_batches(
                test.base, test.layout, test.data, identity['q'], device)
        else:
            store = stack.enter_context(TangentStore.open(test_path))
            gradnet.check_test_store(store, identity)
            batches = gradnet.store_test_batches(store, device)
        accuracy, _, predicted, truth = gradnet.evaluate_candidates(
            model, batches, normalizer)
    n = model.n_classes
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    summary = {'test_accuracy': accuracy, 'samples': int(truth.size),
               'confusion': confusion.tolist()}
    report(as_json, summary,
           f'GradNet test accuracy {accuracy:.4f} on {truth.size} samples\n'
           'confusion matrix (rows: true class, columns: predicted):\n'
           + '\n'.join(' '.join(f'{v:5d}' for v in row) for row in confusion))


@main.command()
@click.option('--base-epochs', type=POSITIVE, default=1, show_default=True,
              help='Epochs of the (weak) base CNN.')
@click.option('--epochs', type=POSITIVE, default=3, show_default=True,
              help='GradNet epochs.')
@click.option('--out', default=None, type=click.Path(file_okay=False),
              help='Keep snapshots, stores and GradNet here (default: a '
                   'temporary folder).')
@common_options
def demo(base_epochs, epochs, out, device, seed, as_json):
    """The whole pipeline on the embedded MNIST, in CPU minutes.

    Trains the base CNN briefly on the 2,000 base digits, extracts sparse
    tangent features of the 2,000 gradnet digits (one random candidate) and
    of the 1,000 test digits (all 10 candidates), fits GradNet and prints
    base vs GradNet test accuracy.
    """
    data = load_dataset('mnist')
    progress = not as_json
    with tempfile.TemporaryDirectory(prefix='gradnet-demo-') as tmp:
        folder = out or tmp
        base_folder = os.path.join(folder, 'base')
        base_summary = train_base(data, 'cnn', base_folder,
                                  epochs=base_epochs, seed=seed,
                                  device=device, overwrite=True,
                                  progress=progress)
        base, _, record = load_base(base_folder, device=device)
        layout = parameter_layout(base)
        stores = {}
        for split, candidates in (('gradnet', 'random'), ('test', 'all')):
            stores[split] = os.path.join(folder, f'{split}.h5')
            extract_to_store(
                base, layout, getattr(data, split), data.n_classes,
                stores[split],
                model_provenance(record['path'], 'cnn', 'mnist', split),
                candidates=candidates, seed=seed, device=device,
                progress=progress, compression='lzf')
        model, normalizer, history = gradnet.fit_stores(
            stores['gradnet'], stores['test'], NormalizeOptions(),
            NetOptions(seed=seed),
            TrainOptions(epochs=epochs, eval_every=0, seed=seed),
            device, progress)
        if out:
            gradnet.save_fit(gradnet.FitFolder(
                os.path.join(out, 'gradnet'), {'demo': True},
                overwrite=True), model, normalizer, history)
    summary = {'base_test_accuracy': base_summary['test_accuracy'],
               'gradnet_test_accuracy': history[-1]['test_accuracy'],
               'base_epochs': base_summary['epochs_run'],
               'gradnet_epochs': epochs, 'device': device}
    report(as_json, summary,
           f"demo on the embedded MNIST (2,000 base / 2,000 gradnet / 1,000 "
           f"test digits): base CNN after {summary['base_epochs']} epoch(s) "
           f"{summary['base_test_accuracy']:.4f}, GradNet after {epochs} "
           f"epoch(s) {summary['gradnet_test_accuracy']:.4f}")


def _reporting(command):
    """``command`` returning ``(summary, line)`` as a command printing it
    (``--json``: the summary)."""
    @functools.wraps(command)
    def wrapper(as_json, **kwargs):
        report(as_json, *command(**kwargs))
    return wrapper


for _name, _command in RBM_COMMANDS:
    main.command(_name)(common_options(_reporting(_command)))
