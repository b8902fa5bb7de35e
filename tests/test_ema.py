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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swap_is_seen_under_autocast_after_the_online_forward(dtype):
    """Autocast caches each trainable parameter's low-precision copy for the whole region, keyed by the parameter;
    the swap must not hand the target the online weights' copy (nor the online calls after it θ⁻'s)."""
    from lcm.ema import swapped_weights

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    shadow = [torch.zeros_like(lin.weight), torch.full_like(lin.bias, 0.5)]
    with torch.autocast("cpu", dtype=dtype):
        online = lin(x)
        with swapped_weights(list(lin.parameters()), shadow):
            target = lin(x)
        again = lin(x)
    assert torch.equal(target, torch.full_like(target, 0.5))
    assert torch.equal(again, online) and online.dtype == dtype


def test_lcd_target_under_bf16_autocast_is_the_ema_network(tiny_sdxl_dir):
    """The training step's order in one autocast region: student forward, then the target θ⁻ on the same module.
    The target must equal a separate copy holding θ⁻ (it equalled the student before the cache was cleared)."""
    import copy

    from diffusers import UNet2DConditionModel

    from lcm.roles import denoiser_role, target_role
    from tests._helpers import sdxl_unet_inputs

    student = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    ema = EMATarget(dict(student.named_parameters()), 0.5)
    with torch.no_grad():
        for s in ema.shadow:
            s.mul_(0.9)  # θ⁻ ≠ θ
    theta_minus = copy.deepcopy(student)
    ema.copy_to(theta_minus.parameters())
    x = sdxl_unet_inputs(student)
    cond = {"encoder_hidden_states": x["encoder_hidden_states"], **x["added_cond_kwargs"]}
    z, t = x["sample"], x["timestep"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        online = denoiser_role(student)(z, t, cond)
        target = target_role(ema, student)(z, t, cond)
        separate = denoiser_role(theta_minus)(z, t, cond)
    torch.testing.assert_close(target, separate)
    assert (target - online).abs().max() > 1e-2
