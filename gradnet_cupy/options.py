"""Typed options of GradNet fitting: what the CLI reads once and the
pipelines take.

Frozen dataclasses, each checking its fields when built (the one-line
:class:`~gradnet_cupy.errors.GradnetError` messages of the code that uses
them): :class:`NetOptions` (the model, :mod:`gradnet_cupy.gradnet.model`),
:class:`TrainOptions` (the loop, :mod:`gradnet_cupy.gradnet.training`),
:class:`MetricOptions` and :class:`NormalizeOptions` (the normalizer,
:mod:`gradnet_cupy.normalize`). :func:`dataclasses.asdict` of a
TrainOptions is what ``gradnet.json`` records in 'settings'.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet.model import check_dropout, check_wiring
from gradnet_cupy.gradnet.training import check_optimizer
from gradnet_cupy.metric import (DEFAULT_MAX_BLOCK, DEFAULT_MAX_BYTES,
                                 DEFAULT_PARTITION, PARTITIONS)
from gradnet_cupy.normalize import normalizer_class


@dataclasses.dataclass(frozen=True)
class NetOptions:
    """The GradNet to build (:func:`gradnet_cupy.gradnet.build_gradnet`).

    ``hidden``: hidden units per input block (tuple of int >= 1), ``(0,)``
    for the linear head (logistic regression, no hidden layer), or None
    for ``hidden_total`` units split in proportion to the block sizes;
    ``wiring``: 'diagonal' or 'adjacent'; ``dropout``: ratio in [0, 1);
    ``batchnorm``: batch normalization before the ReLU; ``seed``: of the
    initial weights.
    """
    hidden: Optional[Tuple[int, ...]] = None
    hidden_total: int = 130
    wiring: str = 'diagonal'
    dropout: float = 0.0
    batchnorm: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.hidden is not None:
            object.__setattr__(self, 'hidden',
                               tuple(int(h) for h in self.hidden))
            if self.hidden != (0,) and min(self.hidden, default=0) < 1:
                raise GradnetError('block and hidden sizes must be positive')
        check_wiring(self.wiring)
        check_dropout(self.dropout)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The training loop (:func:`gradnet_cupy.gradnet.train`).

    ``optimizer``: 'sgd', 'momentum' or 'adam'; ``lr``; ``momentum`` (of
    'momentum'); ``weight_decay`` (0: none); ``batch``: rows per update;
    ``epochs``; ``eval_every``: evaluate every N iterations (None: after
    every epoch; 0: only at the end); ``seed``: of the shuffling (and, online,
    of candidates and augmentation). Field order is the order of
    ``gradnet.json`` 'settings'.
    """
    optimizer: str = 'sgd'
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch: int = 25
    epochs: int = 10
    eval_every: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        check_optimizer(self.optimizer)


@dataclasses.dataclass(frozen=True)
class MetricOptions:
    """The blocks and damping of the ``metric`` normalization
    (:mod:`gradnet_cupy.metric`).

    ``partition``: 'per_layer', 'per_unit' or 'diagonal'; ``max_block``:
    cut longer blocks into pieces (0 or None: no cap); ``damping``: > 0,
    relative to each block's mean diagonal; ``max_bytes``: the memory the
    packed blocks may take.
    """
    partition: str = DEFAULT_PARTITION
    max_block: Optional[int] = DEFAULT_MAX_BLOCK
    damping: float = 1e-3
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        if self.partition not in PARTITIONS:
            raise GradnetError(f"unknown partition {self.partition!r}: "
                               f"choose one of {', '.join(PARTITIONS)}")
        if not self.damping > 0:
            raise GradnetError(f'damping must be > 0, got {self.damping}')


@dataclasses.dataclass(frozen=True)
class NormalizeOptions:
    """The normalization of the features
    (:func:`gradnet_cupy.normalize.fit_normalizer`).

    ``method``: one of :data:`gradnet_cupy.normalize.NORMALIZATIONS`;
    ``power``: the exponent of ``power`` (> 0); ``metric``: the
    :class:`MetricOptions` of ``metric``; ``fit_store``: None (fit on the
    training rows) or the path of a store whose rows the normalizer is
    fitted on instead, e.g. a held-out validation split extracted from the
    same snapshot at the same q (the talk's ``G^{-1/2}`` estimated on
    validation data); store fits only.
    """
    method: str = 'scale_power'
    power: float = 0.5
    metric: MetricOptions = dataclasses.field(default_factory=MetricOptions)
    fit_store: Optional[str] = None

    def __post_init__(self):
        normalizer_class(self.method)
        if not np.isfinite(self.power) or self.power <= 0:
            raise GradnetError(
                f'power exponent must be > 0, got {self.power}')
