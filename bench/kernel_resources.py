"""Registers, spills, stack, static shared memory and theoretical occupancy of
every CUDA kernel of gradnet_cupy.kernels, per arch (sm_80, sm_90), from
nvcc's ptxas report (gradnet_cupy.kernels._resources, which
tests/test_kernel_resources.py also uses for its budgets).

    python bench/kernel_resources.py [--nvcc nvcc] [--out bench/results/kernel-resources.json]

Prints one line per kernel and arch and writes the rows as JSON (written to
a temporary file, then renamed into place).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

from gradnet_cupy.kernels import _resources


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nvcc', default='nvcc')
    parser.add_argument('--out', default='bench/results/kernel-resources.json')
    args = parser.parse_args(argv)
    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        sys.exit(f'error: {args.nvcc} not found')
    rows = _resources.table(nvcc)
    print(f"{'kernel':26} {'arch':6} {'threads':>7} {'regs':>4} "
          f"{'smem B':>6} {'spill':>5} {'stack':>5} {'occupancy':>9}  limit")
    for row in rows:
        print(f"{row['kernel']:26} {row['arch']:6} {row['threads']:7d} "
              f"{row['registers']:4d} {row['shared']:6d} "
              f"{row['spill_stores'] + row['spill_loads']:5d} "
              f"{row['stack']:5d} {row['occupancy']:9.1%}  "
              f"{row['limited_by']}")
    version = subprocess.run([nvcc, '--version'], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
    report = dict(command='python bench/kernel_resources.py', nvcc=version,
                  limits=_resources.SM_LIMITS,
                  register_unit=_resources.REGISTER_UNIT,
                  reserved_shared_per_block=_resources.RESERVED_SHARED,
                  kernels=rows)
    partial = args.out + '.partial'
    with open(partial, 'w') as handle:
        json.dump(report, handle, indent=2)
        handle.write('\n')
    os.replace(partial, args.out)


if __name__ == '__main__':
    main()
