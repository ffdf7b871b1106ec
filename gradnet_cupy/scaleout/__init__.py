"""Extraction and GradNet training over several processes, GPUs and nodes
(``--mpi``, ChainerMN): :mod:`.parallel` (the ranks), :mod:`.extraction`
(one shard per rank, merged by rank 0), :mod:`.training` (data-parallel
batches and evaluation). See docs/scaling.rst."""
from gradnet_cupy.scaleout.parallel import (
    SINGLE, MPIParallel, Parallel, check_same_arguments, connect, start)
from gradnet_cupy.scaleout.extraction import extract_ranks, shard_path

__all__ = ['SINGLE', 'MPIParallel', 'Parallel', 'check_same_arguments',
           'connect', 'start', 'extract_ranks', 'shard_path']
