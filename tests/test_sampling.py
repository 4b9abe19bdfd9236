"""Sampling numerics: any finite temperature > 0 gives a finite distribution (a tiny one is the argmax), and
ordinary temperatures are bit for bit softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch

from runtime.sampling import SamplingParams, probabilities, sample


@pytest.mark.parametrize("t", [1e-38, 1e-45, 1e-300, 5e-324])
def test_tiny_temperature_is_the_argmax_not_nan(t):
    logits = torch.tensor([[10.0, 20.0, 30.0, 30.0], [1.0, 2.0, 3.0, 4.0], [-50.0, 80.0, 79.0, 0.0]])
    p = probabilities(logits, SamplingParams(t))
    assert torch.isfinite(p).all()
    assert p.tolist() == [[0, 0, 0.5, 0.5], [0, 0, 0, 1], [0, 1, 0, 0]]      # ties share the mass
    for top_p in (1.0, 0.5):
        got = sample(logits, SamplingParams(t, top_p), torch.Generator().manual_seed(0))
        assert got[1:].tolist() == [3, 1] and got[0] in (2, 3)


def test_masked_rows_stay_finite_at_tiny_temperature():
    logits = torch.tensor([[float("-inf"), 3.0, float("-inf"), 2.0]])       # a grammar's mask
    assert probabilities(logits, SamplingParams(1e-300)).tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize("t", [0.05, 0.7, 1.0, 2.0])
def test_ordinary_temperatures_unchanged_bit_for_bit(t):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 320, generator=g) * 8
    assert torch.equal(probabilities(logits, SamplingParams(t)), torch.softmax(logits / t, dim=-1))
