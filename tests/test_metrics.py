"""The metric line every trainer shares (``train.logging.optimizer_step_metrics``), on
hand-computed numbers."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest

from posttrain.train import logging as logging_module
from posttrain.train.logging import optimizer_step_metrics

RESULT = SimpleNamespace(loss=2.5, grad_norm=0.75, lr=1e-4, seconds=4.0)


def test_token_counts_and_rates_with_a_loss_mask():
    line = optimizer_step_metrics(RESULT, step=7, epoch=1.234567, tokens=120, trained_tokens=30,
                                  loss_agg_mode="token-mean")
    assert line["step"] == 7 and line["epoch"] == 1.2346
    assert (line["lr"], line["loss"], line["grad_norm"], line["step_time_s"]) == (1e-4, 2.5, 0.75, 4.0)
    assert line["tokens_per_step"] == 30  # trained tokens (the SFT issue's definition)
    assert line["masked_token_count"] == 30  # sum(m_t): the effective batch size (docs/PREFLIGHT.md)
    assert line["untrained_token_count"] == 90
    assert line["tokens_per_sec"] == pytest.approx(120 / 4.0)
    assert line["trained_tokens_per_sec"] == pytest.approx(30 / 4.0)
    assert line["loss_agg_mode"] == "token-mean"


def test_without_a_loss_mask_tokens_per_step_counts_every_token():
    line = optimizer_step_metrics(RESULT, step=1, epoch=0.5, tokens=64, pairs_per_step=4, accuracy=0.75)
    assert line["tokens_per_step"] == 64 and line["pairs_per_step"] == 4 and line["accuracy"] == 0.75
    assert not {"trained_tokens_per_sec", "masked_token_count", "untrained_token_count"} & set(line)


def test_zero_seconds_does_not_divide_by_zero():
    line = optimizer_step_metrics(SimpleNamespace(loss=1.0, grad_norm=0.0, lr=0.0, seconds=0.0),
                                  step=1, epoch=0.0, tokens=10, trained_tokens=5)
    assert line["tokens_per_sec"] > 0 and line["step_time_s"] == 0.0


def test_docstring_examples():
    result = doctest.testmod(logging_module)
    assert result.attempted > 0 and result.failed == 0
