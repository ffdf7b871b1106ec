"""examples/ablations.py (issue #17 §2) on a tiny setting: every part runs
(normalizations fitted on the training rows and on held-out validation
digits), the rows carry their data sizes, the tables and the plot are written and
the stores are removed."""
import importlib.util
import json
import os

EXAMPLE = os.path.join(os.path.dirname(__file__), '..', 'examples',
                       'ablations.py')


def load_example():
    spec = importlib.util.spec_from_file_location('ablations', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_ablation_writes_every_part(tmp_path):
    ablations = load_example()
    out = tmp_path / 'abl'
    result = ablations.main(['--subset', '12', '--gradnet-epochs', '1',
                             '--qs', '90,none', '--structures', 'auto,2,3,4',
                             '--test-subset', '10', '--validation', '6',
                             '--normalizations', 'none,metric-diagonal',
                             '--out', str(out)])
    settings = [(r['part'], r['setting']) for r in result['rows']]
    assert settings == [
        ('q', 'q = 90'), ('q', 'none'), ('q', 'q = 85'),
        ('structure', 'auto 130, diagonal'),
        ('structure', 'auto 130, adjacent'),
        ('structure', '2+3+4, diagonal'), ('structure', '2+3+4, adjacent'),
        ('normalization', 'none, training rows'),
        ('normalization', 'metric-diagonal, training rows'),
        ('normalization', 'scale_power, validation rows (6)'),
        ('normalization', 'metric-diagonal, validation rows (6)'),
        ('candidates', 'random (1 per sample)'),
        ('candidates', 'all (C per sample)')]
    rows = {(r['part'], r['setting']): r for r in result['rows']}
    assert rows['q', 'q = 90']['train_density'] == 0.1
    assert rows['q', 'q = 85']['test_rows'] == 10 * 10
    validated = rows['normalization', 'metric-diagonal, validation rows (6)']
    assert validated['validation_rows'] == 6
    assert validated['train_rows'] == 12
    assert rows['q', 'none']['train_density'] > 0.5
    assert rows['candidates', 'all (C per sample)']['train_rows'] == 120
    assert rows['structure', '2+3+4, diagonal']['hidden_sizes'] == [2, 3, 4]
    assert result['data'] == {'base': 12, 'gradnet': 12, 'test': 10,
                              'validation': 6}
    assert result['finished'] and result['cpu_s'] > 0
    assert all(r['fit_cpu_s'] > 0 for r in result['rows'])
    assert rows['q', 'q = 90']['extract_cpu_s'] > 0
    assert rows['structure', 'auto 130, diagonal']['extract_cpu_s'] == 0
    with open(out / 'ablations.json') as f:
        assert json.load(f)['rows'] == result['rows']
    assert (out / 'ablations.rst').read_text().count('\n') == 3 + 13 + 1
    assert (out / 'accuracy_vs_q.png').read_bytes()[:4] == b'\x89PNG'
    assert not [n for n in os.listdir(out) if n.endswith('.h5')]
    combined = tmp_path / 'combined'
    ablations.main(['--combine', str(out / 'ablations.json'),
                    str(out / 'ablations.json'), '--out', str(combined)])
    assert os.listdir(combined) == ['accuracy_vs_q.png']
    assert (combined / 'accuracy_vs_q.png').read_bytes()[:4] == b'\x89PNG'


def test_shared_base_and_hard_linked_stores_are_reused(tmp_path):
    """A second run with --base of the first one's base and hard links to
    its kept stores fits on those very stores (no extraction: the same
    accuracy, its stores are removed but the first run's stay) and trains
    no base of its own; --wirings picks the structure part's wirings."""
    ablations = load_example()
    common = ['--subset', '12', '--test-subset', '10', '--gradnet-epochs',
              '1']
    first, second = tmp_path / 'first', tmp_path / 'second'
    one = ablations.main(common + ['--parts', 'q', '--qs', '85',
                                   '--keep-stores', '--out', str(first)])
    stores = sorted(n for n in os.listdir(first) if n.endswith('.h5'))
    assert stores == ['gradnet-q85-random.h5', 'test-q85-all.h5']
    second.mkdir()
    for name in stores:
        os.link(first / name, second / name)
    two = ablations.main(common + [
        '--parts', 'q,structure', '--qs', '85', '--structures', 'auto',
        '--wirings', 'adjacent', '--base', str(first / 'base'),
        '--out', str(second)])
    assert not (second / 'base').exists()
    assert two['base_snapshot'] == one['base_snapshot']
    assert [(r['part'], r['setting']) for r in two['rows']] == [
        ('q', 'q = 85'), ('structure', 'auto 130, adjacent')]
    assert two['rows'][0]['gradnet'] == one['rows'][0]['gradnet']
    assert two['rows'][0]['extract_cpu_s'] < one['rows'][0]['extract_cpu_s']
    assert not [n for n in os.listdir(second) if n.endswith('.h5')]
    assert sorted(n for n in os.listdir(first) if n.endswith('.h5')) == stores
