"""Processes that work as one: the :class:`Parallel` interface.

A :class:`Parallel` is what the rest of the package sees of the processes
started together by ``mpiexec``: this process's ``rank`` among ``size``,
and the few collective operations that data-parallel extraction and
training need. :class:`Parallel` itself is the single process (rank 0 of
1, every operation the identity), the default everywhere;
:class:`MPIParallel` runs them over a ChainerMN communicator (MPI through
``mpi4py``; NCCL between GPUs), built by :func:`connect`. Every rank must
call a collective operation at the same point, in the same order.

Neighbours: :mod:`gradnet_cupy.chainer_compat` (ChainerMN),
:mod:`.extraction` and :mod:`.training` (their users), cli (``--mpi``).
"""
import hashlib
import importlib.util
import json
import sys
import traceback

from gradnet_cupy.backend import import_cupy
from gradnet_cupy.errors import GradnetError

INSTALL_HINT = 'pip install "gradnet-cupy[mpi]"'
_JOB = []     # the MPIParallel of this process, once connected


class RanksError(GradnetError):
    """A GradnetError that every rank raises alike (after comparing notes
    with the others): the ranks end together, none waits."""


class Parallel:
    """One process: rank 0 of 1. The base of :class:`MPIParallel`."""
    rank = 0
    size = 1
    local_rank = 0      # rank among the processes of this node

    @property
    def is_root(self):
        """True on rank 0, the rank that writes the outputs."""
        return self.rank == 0

    def mean(self, value):
        """The mean over the ranks of a float ``value`` (every rank gets
        it)."""
        return value

    def allgather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (objects
        that pickle)."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self):
        """Returns once every rank has called it."""

    def optimizer(self, optimizer):
        """``optimizer`` (a Chainer optimizer already set up on its model)
        as one that averages the gradients of all ranks before each update
        and starts from rank 0's weights."""
        return optimizer


class MPIParallel(Parallel):
    """The ranks of one ``mpiexec`` run, over the ChainerMN ``communicator``
    (``chainermn``: the module it comes from)."""

    def __init__(self, chainermn, communicator):
        self._chainermn = chainermn
        self.communicator = communicator
        self.rank = communicator.rank
        self.size = communicator.size
        self.local_rank = communicator.intra_rank
        _JOB[:] = [self]
        sys.excepthook = _abort_after_traceback

    def abort(self, code=1):
        """End every rank of the job now (MPI_Abort)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.communicator.mpi_comm.Abort(code)

    def mean(self, value):
        return self.communicator.allreduce_obj(float(value)) / self.size

    def allgather(self, obj):
        return self.communicator.mpi_comm.allgather(obj)

    def bcast(self, obj):
        # ChainerMN's chunked broadcast (no 2 GiB limit): None on the other
        # ranks, and never None on the root
        return self.communicator.bcast_obj(
            (obj,) if self.is_root else None)[0]

    def barrier(self):
        self.communicator.mpi_comm.Barrier()

    def optimizer(self, optimizer):
        multi = self._chainermn.create_multi_node_optimizer(
            optimizer, self.communicator)
        # ChainerMN broadcasts rank 0's weights in place of the first update
        # that sees a new set of parameters: done here, every update counts
        multi.is_changed(optimizer.target)
        self.communicator.bcast_data(optimizer.target)
        return multi


SINGLE = Parallel()


def connect(device, gradients=False):
    """The :class:`MPIParallel` of the ranks this process was started with
    (by ``mpiexec -n N``; a process started alone is rank 0 of 1).

    ``device`` 'gpu': the rank uses GPU ``local_rank % (GPUs on its node)``
    (made CuPy's current device), and, when the ranks exchange
    ``gradients`` (training), NCCL between the GPUs (ChainerMN's
    ``pure_nccl`` communicator); else MPI alone (``naive``). Raises a
    :class:`GradnetError` naming what is missing when mpi4py, an MPI
    library or NCCL is not installed.
    """
    if importlib.util.find_spec('mpi4py') is None:
        raise GradnetError('--mpi needs mpi4py and an MPI library, and '
                           f'mpi4py is not installed: {INSTALL_HINT}')
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise GradnetError(f'--mpi: mpi4py cannot load an MPI library '
                           f"({' '.join(str(e).split())}): {INSTALL_HINT} "
                           'installs MPICH') from None
    from gradnet_cupy.chainer_compat import import_chainermn
    chainermn = import_chainermn()
    if device == 'gpu':
        cupy = import_cupy()
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        cupy.cuda.Device(node.rank
                         % cupy.cuda.runtime.getDeviceCount()).use()
        node.Free()
    if device != 'gpu' or not gradients:
        return MPIParallel(chainermn, chainermn.create_communicator(
            'naive', MPI.COMM_WORLD))
    try:
        from cupy.cuda import nccl
        nccl.get_version()
    except Exception as e:  # the NCCL library is a separate wheel
        raise GradnetError(
            f'--mpi --device gpu needs NCCL, which CuPy cannot load ({e}): '
            'pip install nvidia-nccl-cu12') from None
    return MPIParallel(chainermn, chainermn.create_communicator(
        'pure_nccl', MPI.COMM_WORLD))


def end_job_on(error, code=1):
    """For a command that ends with ``error`` (exit status ``code``), its
    message already printed: in an MPI job, unless every rank raised it
    alike (:class:`RanksError`), end all ranks (the others may be waiting
    for this one in a collective operation and would hang)."""
    if _JOB and code and not isinstance(error, RanksError):
        _JOB[0].abort(code)


def _abort_after_traceback(kind, value, trace):
    """``sys.excepthook`` of an MPI rank: the traceback, then
    :func:`end_job_on`."""
    traceback.print_exception(kind, value, trace)
    end_job_on(value)


def gather_errors(parallel, run):
    """``run()`` on every rank, then: its result if no rank failed, else a
    :class:`RanksError` on every rank naming the first failed rank and its
    error (so that no rank waits forever for one that gave up)."""
    try:
        result, error = run(), None
    except (GradnetError, OSError) as e:
        result, error = None, e
    errors = parallel.allgather(None if error is None else str(error))
    failed = [(rank, text) for rank, text in enumerate(errors) if text]
    if error is not None and parallel.size == 1:
        raise error
    if failed:
        rank, text = failed[0]
        raise RanksError(f'rank {rank} of {parallel.size}: {text}')
    return result


def check_same_arguments(parallel, arguments):
    """GradnetError on every rank unless all ranks pass equal
    ``arguments`` (a JSON-able dict: the command's parsed options); the
    ranks compare a hash of them."""
    text = json.dumps(arguments, sort_keys=True, default=str)
    digests = parallel.allgather(hashlib.sha256(text.encode()).hexdigest())
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RanksError(
            f"the {parallel.size} MPI ranks were started with different "
            f"arguments (rank(s) {', '.join(map(str, differ))} differ from "
            'rank 0): start every rank with the same command')


def start(mpi, device, arguments, gradients=False):
    """The ranks a command runs with: :data:`SINGLE` unless ``mpi``, else
    :func:`connect` ``(device, gradients)`` after
    :func:`check_same_arguments` ``(arguments)``."""
    if not mpi:
        return SINGLE
    parallel = connect(device, gradients)
    check_same_arguments(parallel, arguments)
    return parallel
