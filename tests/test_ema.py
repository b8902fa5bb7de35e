import pytest
import torch

from lcm.ema import EMATarget, ema_update_


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


def test_ema_target_swaps_in_and_copies_out_the_shadow():
    model = torch.nn.Linear(3, 2)
    ema = EMATarget(dict(model.named_parameters()), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # θ moves away from θ⁻, so the swap and the copy are visible
    theta = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        for p, s in zip(model.parameters(), ema.shadow):
            torch.testing.assert_close(p, s)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    ema.copy_to(model.parameters())
    for p, s in zip(model.parameters(), ema.shadow):
        assert torch.equal(p, s) and p.data_ptr() != s.data_ptr()  # copied, not aliased
    with pytest.raises(ValueError, match="copy_to"):
        ema.copy_to([model.weight])
