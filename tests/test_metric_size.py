"""metric-size (issue #17 §3): the byte counts against BlockMetric's own
memory check and against plain integer arithmetic."""
import json
import math

import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import main
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.metric import (PARTITIONS, BlockMetric, check_memory,
                                 layout_blocks)
from gradnet_cupy.metric.size import (flat_layout, format_bytes, metric_size,
                                      resnet50_layout)
from gradnet_cupy.models import MODELS, build_model
from gradnet_cupy.tangent import parameter_layout

MNIST = (1, 28, 28)


def model_weights(arch):
    """(model, [W shapes]) of a package model on MNIST-shaped input."""
    model = build_model(arch, MNIST, 10)
    shapes = [p.shape for name, p in sorted(model.namedparams())
              if name.endswith('/W')]
    return model, shapes


def oracle_block_entries(shapes, partition, cap):
    """sum size_b ** 2 by plain integer arithmetic: blocks per W entry
    (per_unit: one per output unit of fan-in entries), cut into
    ceil(size / cap) near-equal pieces."""
    total = 0
    for shape in shapes:
        size = math.prod(shape)
        if partition == 'diagonal':
            total += size
            continue
        count, length = ((shape[0], size // shape[0])
                         if partition == 'per_unit' else (1, size))
        pieces = 1 if cap is None else -(-length // cap)
        small, extra = divmod(length, pieces)
        total += count * ((pieces - extra) * small ** 2
                          + extra * (small + 1) ** 2)
    return total


@pytest.mark.parametrize('arch', sorted(MODELS))
@pytest.mark.parametrize('partition', PARTITIONS)
@pytest.mark.parametrize('cap', [None, 7, 256])
def test_block_bytes_agree_with_the_memory_check(arch, partition, cap):
    model, shapes = model_weights(arch)
    layout = parameter_layout(model)
    report = metric_size(layout, partition, cap, 1 << 30)
    need = report['total']['block_bytes']
    assert need == 12 * oracle_block_entries(shapes, partition, cap)
    assert need == sum(layer['block_bytes'] for layer in report['layers'])
    blocks, _ = layout_blocks(layout, partition, cap)
    check_memory(blocks, need)                  # exactly enough: passes
    with pytest.raises(GradnetError, match='needs'):
        check_memory(blocks, need - 1)
    assert report['fits'] == (need <= 1 << 30)
    assert report['total']['blocks'] == len(blocks)


def test_a_block_metric_is_refused_one_byte_short():
    layout = parameter_layout(build_model('cnn', MNIST, 10))
    need = metric_size(layout, 'per_unit', 64, 0)['total']['block_bytes']
    BlockMetric.from_layout(layout, 'per_unit', 64, max_bytes=need)
    with pytest.raises(GradnetError, match='needs'):
        BlockMetric.from_layout(layout, 'per_unit', 64, max_bytes=need - 1)


@pytest.mark.parametrize('arch', sorted(MODELS))
def test_full_and_diagonal_bytes_are_n_squared_arithmetic(arch):
    model, shapes = model_weights(arch)
    n = sum(math.prod(s) for s in shapes)
    report = metric_size(parameter_layout(model), 'per_unit', 256, 1 << 30)
    total = report['total']
    assert total['params'] == n
    assert total['full_g_bytes'] == n * n * 8
    assert total['full_inverse_sqrt_bytes'] == n * n * 4
    assert total['full_bytes'] == n * n * 12
    assert total['diagonal_bytes'] == n * 12
    sizes = sorted(math.prod(s) for s in shapes)
    layers = sorted(report['layers'], key=lambda layer: layer['params'])
    assert [layer['params'] for layer in layers] == sizes
    assert [layer['full_bytes'] for layer in layers] == \
        [size * size * 12 for size in sizes]
    assert [layer['diagonal_bytes'] for layer in layers] == \
        [size * 12 for size in sizes]


def test_resnet50_has_the_published_weight_count():
    # torchvision's resnet50 has 25,557,032 parameters: minus the gamma and
    # beta of 26,560 batch-normalized channels and the 1,000 fc biases
    layout = resnet50_layout()
    assert layout.n_params == 25_557_032 - 2 * 26_560 - 1_000
    assert len(layout.entries) == 54
    report = metric_size(layout, 'per_unit', 256, 1 << 30)
    assert report['total']['full_inverse_sqrt_bytes'] == \
        layout.n_params ** 2 * 4
    assert not report['fits']


def test_the_talks_25_2m_parameters():
    report = metric_size(flat_layout(25_200_000), 'per_layer', 256, 1 << 40)
    assert report['total']['full_inverse_sqrt_bytes'] == 25_200_000 ** 2 * 4
    assert format_bytes(report['total']['full_inverse_sqrt_bytes']) == \
        '2.3 PiB'
    # ceil(25.2M / 256) = 98,438 near-equal pieces: 98,310 of 256 columns
    # and 128 of 255 (98,310 * 256 + 128 * 255 = 25.2M)
    assert report['total']['blocks'] == 98_438
    assert report['total']['block_bytes'] == 12 * (98_310 * 256 ** 2
                                                     + 128 * 255 ** 2)


def test_command_prints_json_and_a_table():
    runner = CliRunner()
    result = runner.invoke(main, ['metric-size', '--arch', 'mlp',
                                  '--partition', 'per_layer',
                                  '--max-block', '0', '--json'])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary['total']['params'] == 244_032
    assert summary['total']['block_bytes'] == 12 * sum(
        math.prod(s) ** 2 for s in model_weights('mlp')[1])
    assert summary['fits'] is False
    result = runner.invoke(main, ['metric-size', '--arch', 'resnet50'])
    assert result.exit_code == 0, result.output
    assert 'n = 25,502,912' in result.output
    assert 'does not fit' in result.output


@pytest.mark.parametrize('args, message', [
    (['--params', '0'], '--params must be >= 1'),
    (['--max-block', '-1'], '--max-block must be >= 0'),
    (['--in-shape', '1,x,28'], 'is not C,H,W'),
])
def test_bad_input_is_one_error_line(args, message):
    result = CliRunner().invoke(main, ['metric-size'] + args)
    assert result.exit_code == 1
    assert result.output.startswith('error: ') and message in result.output
    assert len(result.output.strip().splitlines()) == 1
