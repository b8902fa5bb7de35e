import pytest
import torch

from lcm.ema import ema_update_


def test_mu_zero_copies_mu_one_keeps_and_half_averages():
    online = [torch.randn(3, 3), torch.randn(5)]
    for mu, expect in [(0.0, lambda t, o: o), (1.0, lambda t, o: t), (0.5, lambda t, o: (t + o) / 2)]:
        target = [torch.randn(3, 3), torch.randn(5)]
        before = [t.clone() for t in target]
        ema_update_(target, online, mu)
        for t, b, o in zip(target, before, online):
            torch.testing.assert_close(t, expect(b, o))


def test_rejects_bad_mu_and_mismatched_lists():
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(1)], [torch.zeros(1)], 1.5)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(1)], [], 0.5)
