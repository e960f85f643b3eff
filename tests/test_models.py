"Tests for `meanflow_nb.models` that are easier as pytest: JVP through each network, registry errors, param counts."
import pytest, torch
from meanflow_nb.core import ConfigError
from meanflow_nb.models import *


def test_toy_mlp_shapes_jvp_null_label():
    torch.manual_seed(0)
    m = ToyMLP(dim=2, hidden=32, depth=3, num_classes=4, emb_dim=16)
    z, t, h = torch.randn(6, 2), torch.rand(6), torch.rand(6) * 0.3
    with torch.no_grad():
        assert m(z, t, h).shape == (6, 2)
        assert torch.equal(m(z, t, h), m(z, t, h, torch.full((6,), 4)))
        assert not torch.equal(m(z, t, h), m(z, t, h, torch.zeros(6, dtype=torch.long)))
    u, dudt = torch.func.jvp(lambda z, t, h: m(z, t, h), (z, t, h), (torch.randn(6, 2), torch.ones(6), torch.ones(6)))
    assert u.shape == dudt.shape == (6, 2) and torch.isfinite(dudt).all()
    with pytest.raises(ConfigError, match='labels must lie'): m(z, t, h, torch.full((6,), 5))
    # unconditional model ignores y=None
    assert ToyMLP(dim=3, hidden=16, depth=2)(torch.randn(2, 3), torch.rand(2), torch.rand(2)).shape == (2, 3)
