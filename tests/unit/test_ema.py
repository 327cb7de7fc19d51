"""ema.py: the weight EMA against its closed form, the swap for evaluation, what it averages."""

import pytest
import torch
from torch import nn

from fastvideo_grpo.training.ema import WeightEMA


def _closed_form(history, decay):
    """EMA after n updates from w_0 with weights w_1..w_n: d^n w_0 + (1 - d) sum_i d^(n - i) w_i (float64)."""
    n = len(history) - 1
    out = decay ** n * history[0].double()
    for i in range(1, n + 1):
        out = out + (1 - decay) * decay ** (n - i) * history[i].double()
    return out


def test_ema_matches_the_closed_form_and_swaps_for_evaluation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    decay = 0.9
    ema = WeightEMA(net, decay)
    hist = {n: [p.detach().clone()] for n, p in net.named_parameters()}
    for _ in range(7):  # "training": arbitrary new weights each iteration
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in net.named_parameters():
            hist[n].append(p.detach().clone())
    assert ema.num_updates == 7
    for n, _ in net.named_parameters():
        torch.testing.assert_close(ema.state_dict()[n].double(), _closed_form(hist[n], decay), rtol=1e-6, atol=1e-6)
    live = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 4)
    with ema.applied():
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), ema.state_dict()[n])
        y_ema = net(x)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), live[n])  # restored exactly
    assert not torch.allclose(net(x), y_ema)


def test_ema_keeps_float32_for_low_precision_weights_and_skips_frozen_ones():
    net = nn.Linear(8, 8).to(torch.bfloat16)
    net.bias.requires_grad_(False)  # frozen (e.g. the base weights under LoRA): never changes, not averaged
    ema = WeightEMA(net, 0.995)
    assert list(ema.state_dict()) == ["weight"] and ema.state_dict()["weight"].dtype == torch.float32
    target = torch.ones(8, 8)
    with torch.no_grad():
        net.weight.copy_(target)
    before = ema.state_dict()["weight"].clone()
    ema.update()
    # a (1 - d) = 0.005 step survives in float32 (in bfloat16 it would mostly round away)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.995 * before + 0.005 * target)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(nn.Linear(2, 2), decay)
