"""GeometricNoiseSchedule: closed-form identities of the VE geometric schedule."""

import math

import pytest
import torch

from methods.noise import GeometricNoiseSchedule


@pytest.mark.parametrize("smin,smax", [(1e-5, 1.0), (1e-5, 3.0), (0.01, 2.0), (0.5, 4.0)])
def test_h_is_integral_of_g_squared(smin, smax):
    s = GeometricNoiseSchedule(smin, smax)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    g2 = s.g(t) ** 2
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(g2, t)])
    torch.testing.assert_close(cum, s.h(t), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("smin,smax", [(1e-5, 1.0), (0.5, 4.0)])
def test_derivative_of_h_is_g_squared(smin, smax):
    s = GeometricNoiseSchedule(smin, smax)
    t = torch.rand(50, dtype=torch.float64, requires_grad=True)
    (dh,) = torch.autograd.grad(s.h(t).sum(), t)
    torch.testing.assert_close(dh, s.g(t.detach()) ** 2, rtol=1e-10, atol=1e-14)


def test_endpoints_and_prior_scale():
    s = GeometricNoiseSchedule(0.5, 4.0)
    assert float(s.h(0.0)) == 0.0
    assert s.prior_scale == pytest.approx(math.sqrt(4.0**2 - 0.5**2))
    assert float(s.sigma(1.0)) == pytest.approx(s.prior_scale)
    # σ(t) = σmin·sqrt(σd^{2t} − 1): at σd^{2t} = 2 the std is σmin
    t_half = math.log(2) / (2 * math.log(8.0))
    assert float(s.sigma(t_half)) == pytest.approx(0.5)


def test_tensor_in_out_and_validation():
    s = GeometricNoiseSchedule(1e-3, 1.0)
    t = torch.rand(3, 4)
    assert s.g(t).shape == (3, 4) and s.h(t).dtype == t.dtype
    with pytest.raises(ValueError, match="sigma_min"):
        GeometricNoiseSchedule(1.0, 0.5)
