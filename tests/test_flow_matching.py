"""The shared flow-matching math against hand-computed values."""

import pytest
import torch

from trainer.flow_matching import noisy_and_target, sample_sigmas, shift_sigmas, step_generator


def test_shift_matches_scheduler_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # shift 3: 3t / (1 + 2t)
    assert torch.allclose(shift_sigmas(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(t, 1.0), t)


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "sigmoid"])
def test_sigmas_in_range_and_shift_moves_them_up(method):
    low = sample_sigmas(4000, method, 1.0, torch.Generator().manual_seed(0))
    high = sample_sigmas(4000, method, 5.0, torch.Generator().manual_seed(0))
    assert low.min() > 0 and low.max() < 1
    assert high.mean() > low.mean() + 0.1


def test_logit_normal_is_centred():
    s = sample_sigmas(20000, "logit_normal", 1.0, torch.Generator().manual_seed(1))
    assert abs(s.median().item() - 0.5) < 0.02


def test_noisy_and_target_interpolate():
    x0 = torch.randn(2, 4, 3, 2, 2)
    sigmas = torch.tensor([0.0, 1.0])
    noisy, target = noisy_and_target(x0, sigmas, torch.Generator().manual_seed(0))
    noise = target + x0
    assert torch.allclose(noisy[0], x0[0]) and torch.allclose(noisy[1], noise[1])


def test_step_generator_depends_only_on_seed_step_rank():
    a = torch.rand(3, generator=step_generator(1, 5, 0))
    assert torch.equal(a, torch.rand(3, generator=step_generator(1, 5, 0)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(1, 6, 0)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(1, 5, 1)))
