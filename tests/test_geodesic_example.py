"""examples/geodesic_mnist.py on tiny settings: the passes each method is
given (--finetune-passes, --equal-passes)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).parent.parent / 'examples' / 'geodesic_mnist.py'


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    return tmp_path_factory.mktemp('nets')


def sparsify_rows(nets, out, *extra):
    subprocess.run(
        [sys.executable, str(EXAMPLE), '--nets', str(nets), '--out',
         str(out), '--parts', 'sparsify', '--device', 'cpu',
         '--base-epochs', '1', '--sparsities', '0.7', '--methods',
         'geodesic,one-shot,prune-finetune', '--max-steps', '3', '--batch',
         '2', '--eval-every', '0', '--finetune-passes', '0.05', *extra],
        check=True, capture_output=True)
    rows = json.loads((out / 'sparsify.json').read_text())['rows']
    return {r['method']: r for r in rows}


@pytest.mark.parametrize('equal', [False, True])
def test_equal_passes_gives_one_shot_the_geodesic_total(nets, tmp_path,
                                                        equal):
    rows = sparsify_rows(nets, tmp_path / 'run',
                         *(['--equal-passes'] if equal else []))
    walk = 3 * 2 / 4000                 # 3 steps of 2 of the 4,000 digits
    total = walk + 0.05
    assert rows['geodesic']['passes'] == pytest.approx(total)
    assert rows['prune-finetune']['passes'] == pytest.approx(total)
    assert rows['one-shot']['passes'] == pytest.approx(total if equal
                                                       else 0.05)
    for row in rows.values():
        assert row['zeros'] == pytest.approx(0.7, abs=0.01)


def test_solver_options_reach_the_walk(nets, tmp_path):
    """--solver block (--partition, --max-block) changes the walk's steps;
    the same settings give the same walk."""
    def mus(name, *extra):
        out = tmp_path / name
        subprocess.run(
            [sys.executable, str(EXAMPLE), '--nets', str(nets), '--out',
             str(out), '--parts', 'sparsify', '--device', 'cpu',
             '--base-epochs', '1', '--sparsities', '0.7', '--methods',
             'geodesic', '--max-steps', '2', '--batch', '2',
             '--eval-every', '0', *extra], check=True, capture_output=True)
        history = json.loads((out / 'walk_geodesic_0.7.json').read_text())[
            'history']
        return [h['mu'] for h in history if 'mu' in h]

    exact = mus('exact')
    block = ['--solver', 'block', '--partition', 'per_unit']
    small, large = mus('small', *block, '--max-block', '8'), mus(
        'large', *block, '--max-block', '64')
    assert len(exact) == len(small) == len(large) == 2
    assert small == mus('again', *block, '--max-block', '8')
    assert not np.allclose(exact, small) and not np.allclose(small, large)
