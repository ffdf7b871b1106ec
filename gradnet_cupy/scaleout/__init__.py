"""Extraction and GradNet training over several processes, GPUs and nodes
(``--mpi``, ChainerMN): :mod:`.parallel` (the ranks), :mod:`.extraction`
(one shard per rank, merged by rank 0), :mod:`.training` (data-parallel
batches and evaluation; imported by :mod:`gradnet_cupy.gradnet`, not
here: it builds on it). See docs/scaling.rst."""
from gradnet_cupy.scaleout.parallel import (
    SINGLE, MPIParallel, Parallel, RanksError, check_same_arguments, connect,
    end_job_on, gather_errors, start)
from gradnet_cupy.scaleout.extraction import extract_ranks, shard_path

__all__ = ['SINGLE', 'MPIParallel', 'Parallel', 'RanksError',
           'check_same_arguments', 'end_job_on',
           'connect', 'start', 'extract_ranks', 'gather_errors', 'shard_path']
