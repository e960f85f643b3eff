"Tests for `meanflow_nb.models`: JVPs against float64 finite differences, zero-init, null labels, heads, errors, sizes."
import pytest, torch
from meanflow_nb.core import ConfigError
from meanflow_nb.models import *
from meanflow_nb.models import JVPLinear

TINY = dict(input_size=8, in_channels=1, num_classes=10)


def randomize_(m, std=0.1, seed=0):
    "Overwrite every parameter with noise, so zero-init cannot hide bugs."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def u_fn(m, y):
    "u(z, t, h) for either family (iMF ignores t: it only sees h)."
    if isinstance(m, iMFDiT):
        om = torch.full((y.shape[0],), 3., dtype=torch.float64)
        return lambda z, t, h: m(z, h, om, 0.2 * om / om, 0.8 * om / om, y, return_v=False)
    return lambda z, t, h: m(z, t, h, y)


def fd(f, args, tans, eps=1e-6):
    with torch.no_grad():
        return (f(*[a + eps * d for a, d in zip(args, tans)]) - f(*[a - eps * d for a, d in zip(args, tans)])) / (2 * eps)


def test_toy_mlp_shapes_jvp_null_label():
    torch.manual_seed(0)
    m = ToyMLP(dim=2, hidden=32, depth=3, num_classes=4, emb_dim=16)
    z, t, h = torch.randn(6, 2), torch.rand(6), torch.rand(6) * 0.3
    with torch.no_grad():
        assert m(z, t, h).shape == (6, 2)
        assert torch.equal(m(z, t, h), m(z, t, h, torch.full((6,), 4)))
        assert not torch.equal(m(z, t, h), m(z, t, h, torch.zeros(6, dtype=torch.long)))
    m64 = m.double(); args = (z.double(), t.double(), h.double())
    tans = (torch.randn(6, 2, dtype=torch.float64), torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    u, dudt = torch.func.jvp(lambda z, t, h: m64(z, t, h), args, tans)
    torch.testing.assert_close(dudt, fd(lambda z, t, h: m64(z, t, h), args, tans), rtol=1e-6, atol=1e-8)
    with pytest.raises(ConfigError, match='labels must lie'): m(z.double(), t.double(), h.double(), torch.full((6,), 5))
    assert ToyMLP(dim=3, hidden=16, depth=2)(torch.randn(2, 3), torch.rand(2), torch.rand(2)).shape == (2, 3)


@pytest.mark.parametrize('name', ['DiT-T/2', 'iMF-T/2'])
@pytest.mark.parametrize('fast', [True, False])
def test_jvp_matches_finite_differences(name, fast):
    m = randomize_(create_model(name, **TINY)).double()
    y = torch.tensor([0, 3, 10])                                   # includes the null label
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64),
            0.5 * torch.rand(3, generator=g, dtype=torch.float64))
    tans = (torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    f = u_fn(m, y)
    with pytest.raises(NotImplementedError): torch.func.jvp(f, args, tans)   # fused SDPA has no forward AD
    JVPLinear.fast = fast
    try:
        with jvp_attention(): u, dudt = torch.func.jvp(f, args, tans)
    finally: JVPLinear.fast = True
    ref = fd(f, args, tans)
    assert dudt.abs().max() > 1e-3                                # not trivially zero
    torch.testing.assert_close(dudt.detach(), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('name', ['DiT-T/2', 'iMF-T/2'])
def test_fast_linear_gives_identical_gradients(name):
    "The MeanFlow loss gradient is the same with the one-matmul JVP rule and with PyTorch's own."
    m = randomize_(create_model(name, **TINY)).double()
    y = torch.tensor([1, 2])
    x, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.4], dtype=torch.float64); h = torch.tensor([0.5, 0.1], dtype=torch.float64)
    grads = []
    for fast in (True, False):
        JVPLinear.fast = fast; m.zero_grad()
        with jvp_attention(): u, dudt = torch.func.jvp(u_fn(m, y), (x, t, h), (v, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)))
        ((u - (v - h[:, None, None, None] * dudt).detach()) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    JVPLinear.fast = True
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_dit_zero_init_null_label_and_shapes():
    m = create_model('DiT-T/2', input_size=16, in_channels=3, num_classes=10)
    x, t, h = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(m(x, t, h), torch.zeros_like(x))     # adaLN-Zero + zero output layer
        randomize_(m)
        assert torch.equal(m(x, t, h), m(x, t, h, torch.full((2,), 10)))
        with torch.autocast('cpu', dtype=torch.bfloat16): ub = m(x, t, h)
        u = m(x, t, h)
    assert u.shape == x.shape
    assert (ub.float() - u).norm() / u.norm() < 0.05              # bf16 autocast forward works


def test_imf_tokens_heads_and_variants():
    m = create_model('iMF-T/2', input_size=16, in_channels=3, num_classes=10)
    x, h = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        u, v = m(x, h, torch.tensor([1., 4.]), torch.zeros(2), torch.ones(2))
        assert torch.equal(u, torch.zeros_like(x)) and torch.equal(v, torch.zeros_like(x))
        randomize_(m)
        assert m.build_sequence(x, h, torch.ones(2), torch.zeros(2), torch.ones(2), None).shape == (2, 20 + 64, 64)
        u, v = m(x, h, 2., 0.1, 0.9)                               # python floats broadcast
        assert u.shape == v.shape == x.shape and not torch.equal(u, v)
        assert torch.equal(u, m(x, h, 2., 0.1, 0.9, torch.full((2,), 10), return_v=False))  # None == null row
        n_train = sum(p.numel() for p in m.parameters())
        m.drop_v_head()
        assert torch.equal(m(x, h, 2., 0.1, 0.9), u)              # u unchanged, v gone
        assert not any(n.startswith('v_') for n, _ in m.named_parameters())
    assert sum(p.numel() for p in m.parameters()) < n_train
    m0 = create_model('iMF-T/2', v_head=False, **TINY)
    assert isinstance(m0(torch.randn(2, 1, 8, 8), torch.rand(2)), torch.Tensor)
    assert sum(p.numel() for p in m0.parameters()) == count_params('iMF-T/2', **TINY)


def test_errors():
    with pytest.raises(ConfigError, match=r"unknown model 'DiT-Z/2'; valid: DiT-B/4, .*iMF-XL/2"): create_model('DiT-Z/2')
    with pytest.raises(ConfigError, match='input_size 30 is not divisible by patch_size 4'): create_model('DiT-B/4', input_size=30)
    with pytest.raises(ConfigError, match='no option'): create_model('iMF-T/2', n_heads=3)
    for name in ('DiT-T/2', 'iMF-T/2'):
        m = create_model(name, **TINY)
        args = (torch.rand(2), torch.rand(2)) if name.startswith('DiT') else (torch.rand(2),)
        with pytest.raises(ConfigError, match='built for 1 input channels, got 4'): m(torch.randn(2, 4, 8, 8), *args)
        with pytest.raises(ConfigError, match='built for 8x8 inputs'): m(torch.randn(2, 1, 16, 16), *args)
        with pytest.raises(ConfigError, match=r'labels must lie in \[0, 10\]'): m(torch.randn(2, 1, 8, 8), *args, y=torch.tensor([0, 11]))
        with pytest.raises(ConfigError, match='integer tensor'): m(torch.randn(2, 1, 8, 8), *args, y=torch.tensor([0., 1.]))


@pytest.mark.parametrize('name,paper', sorted(PAPER_PARAMS.items()))
def test_param_counts_within_1pct(name, paper):
    n = count_params(name)
    assert abs(n / paper - 1) < 0.01, f'{name}: {n:,} vs paper {paper:,.0f}'


def test_bench_smoke():
    r = bench_models('DiT-T/2', batch=2, steps=5)   # medians of 5 rounds: one round can invert on a loaded machine
    assert r['fm_step_ms'] > 0 and r['mf_step_ms'] > 0
    # the network it timed is the one asked for: its parameters, counted another way (built on the meta device)
    assert r['params'] == count_params('DiT-T/2', input_size=8, in_channels=1, num_classes=10)
    # a MeanFlow step does a flow-matching step's work plus a JVP through the network: it cannot be cheaper
    assert r['mf_over_fm'] > 1, r
