"""Issue 24, the parts that run on a CPU: no tangent graph kept for backward (MF and iMF), the JVP of iMF on the u output
only, `set_precision` leaving torch's legacy getters answering, and the planner (FLOPs against `FlopCounterMode`, the
`mf-bench plan` command line). The references here are computed independently of the code under test: the old JVP
paths are re-implemented below, saved bytes are counted by a hook written here, FLOPs by torch's own counter."""
import json, math, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch

torch.set_num_threads(1)  # small models on 2 shared cores


def _unzero(net, seed=0):
    "Give the zero-initialised layers (adaLN-Zero, output linears, gates) small random values: a non-trivial JVP."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if (p == 0).all(): p.normal_(0, 0.02, generator=g)
    return net


def _saved_bytes(fn):
    """Peak bytes held for backward while `fn()` runs: every tensor autograd saves counts from its pack until the graph
    node holding it is freed (so a graph dropped during the forward counts only while it lived)."""
    import weakref
    n = dict(cur=0, peak=0)
    class Held:
        def __init__(self, t): self.t = t
    def free(b): n['cur'] -= b
    def pack(t):
        h, b = Held(t), t.numel() * t.element_size()
        n['cur'] += b; n['peak'] = max(n['peak'], n['cur']); weakref.finalize(h, free, b)
        return h
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t): out = fn()
    return n['peak'], out


def _grads(net, loss_fn, x, y, d):
    net.zero_grad(set_to_none=True)
    loss_fn(net, x, y, **d)['loss'].backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).double()


def _old_meanflow_target(u_fn, z, t, r, v):
    "The path before issue 24: one `torch.func.jvp` with grad on, so autograd also records the tangent's computation."
    from meanflow_nb.loss import jvp_call
    u, dudt = jvp_call(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return u, (v - (t - r).view(-1, *[1] * (z.ndim - 1)) * dudt).detach()


def _old_imf_compound(u_fn, z, t, r, v_theta, has_aux=False, tangent_fn=None):
    "The iMF path before issue 24: the JVP with grad through u and the v-head (whose tangent was discarded)."
    from meanflow_nb.loss import jvp_call
    out = jvp_call(u_fn, (z, t, r), (v_theta, torch.ones_like(t), torch.zeros_like(r)), has_aux=has_aux)
    u, dudt, v = out if has_aux else (*out, None)
    return u + (t - r).view(-1, *[1] * (z.ndim - 1)) * dudt.detach(), u, dudt, v


def _per_sample_saved(net, lf, batches=(4, 12), size=8):
    "Saved bytes per sample of one loss evaluation: the slope between two batch sizes (constants cancel)."
    b = []
    for B in batches:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(B, 4, size, size, generator=g), torch.randint(0, 10, (B,), generator=g)
        n, out = _saved_bytes(lambda: lf(net, x, y, **lf.draw(B, x.shape[1:], g))['loss'])
        out.backward(); b.append(n)
    return (b[1] - b[0]) / (batches[1] - batches[0])


def test_mf_jvp_sample_keeps_no_tangent_graph(monkeypatch):
    """DiT-D/2: a JVP sample (r < t) saves at most 1.3x the bytes of a plain sample (r = t) for backward (the old path,
    one JVP with grad, saves far more), and the gradients equal the old path's to a relative 1e-6."""
    import meanflow_nb.loss as L
    from meanflow_nb.models import create_model
    torch.manual_seed(0)
    net = _unzero(create_model('DiT-D/2', input_size=8, in_channels=4, num_classes=10))
    plain = _per_sample_saved(net, L.MeanFlowLoss(num_classes=10, ratio_r_eq_t=1.0))
    jvp = _per_sample_saved(net, L.MeanFlowLoss(num_classes=10, ratio_r_eq_t=0.0))
    with monkeypatch.context() as m:
        m.setattr(L, 'meanflow_target', _old_meanflow_target)
        old = _per_sample_saved(net, L.MeanFlowLoss(num_classes=10, ratio_r_eq_t=0.0))
    print(f'DiT-D/2 saved bytes per sample: plain {plain / 2**20:.3f} MB, JVP {jvp / 2**20:.3f} MB ({jvp / plain:.2f}x), '
          f'old JVP path {old / 2**20:.3f} MB ({old / plain:.2f}x)')
    assert jvp <= 1.3 * plain, (jvp, plain)
    assert old > 2 * plain, (old, plain)                                     # the measure sees the tangent graph
    g = torch.Generator().manual_seed(1)
    lf = L.MeanFlowLoss(num_classes=10, ratio_r_eq_t=0.5, cfg_omega=1.5, cfg_kappa=0.3)   # guided, both kinds of sample
    x, y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g); d = lf.draw(16, x.shape[1:], g)
    new = _grads(net, lf, x, y, d)
    with monkeypatch.context() as m:
        m.setattr(L, 'meanflow_target', _old_meanflow_target); ref = _grads(net, lf, x, y, d)
    rel = float((new - ref).norm() / ref.norm())
    print(f'MF gradient, new against old path: relative difference {rel:.1e}')
    assert ref.norm() > 0 and rel <= 1e-6, rel


@pytest.mark.parametrize('v_head', [True, False])
def test_imf_jvp_covers_u_only(monkeypatch, v_head):
    """iMF: no tensor inside the JVP reaches the v-head (its tangent was thrown away), the JVP keeps no graph, and the
    gradients equal the old path's (one JVP with grad through both heads) to a relative 1e-6."""
    import meanflow_nb.imf as I
    from meanflow_nb.models import create_model
    torch.manual_seed(0)
    net = _unzero(create_model('iMF-T/2', input_size=8, in_channels=4, num_classes=10, v_head=v_head))
    lf = I.IMFLoss(num_classes=10, v_head=v_head)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g); d = lf.draw(16, x.shape[1:], g)
    wrapped = []
    if v_head:
        hook = net.v_blocks[0].register_forward_pre_hook(
            lambda mod, args: wrapped.append(torch._C._functorch.is_functorch_wrapped_tensor(args[0])))
    new = _grads(net, lf, x, y, d)
    if v_head:
        hook.remove()
        assert wrapped and not any(wrapped), wrapped                         # the v-head ran, never on JVP tensors
    with monkeypatch.context() as m:
        m.setattr(I, 'imf_compound', _old_imf_compound); ref = _grads(net, lf, x, y, d)
    rel = float((new - ref).norm() / ref.norm())
    print(f'iMF (v_head={v_head}) gradient, new against old path: relative difference {rel:.1e}')
    assert ref.norm() > 0 and rel <= 1e-6, rel
    if v_head:
        saved = _per_sample_saved(net, lf)
        with monkeypatch.context() as m:
            m.setattr(I, 'imf_compound', _old_imf_compound); old = _per_sample_saved(net, lf)
        print(f'iMF-T/2 saved bytes per sample: {saved / 2**20:.3f} MB, old path {old / 2**20:.3f} MB ({saved / old:.2f}x)')
        assert saved < 0.6 * old, (saved, old)


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_set_precision_leaves_legacy_getters_answering(device):
    """After `set_precision`, torch's legacy getters answer (mixing the newer `fp32_precision` attributes with them
    raises in torch 2.14); for a CUDA device the TF32 settings read back as asked (a CPU-only build accepts them too),
    and for the CPU nothing changes."""
    from meanflow_nb.train import set_precision
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for tf32 in (True, False):
            r = set_precision(tf32, device)
            got = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            if device == 'cuda': assert got == (('high', True, True) if tf32 else ('highest', False, False)), got
            else: assert got == before, got
            assert r['matmul'] == got[0], r
    finally:
        torch.set_float32_matmul_precision(before[0]); torch.backends.cudnn.allow_tf32 = before[2]


class _Cfg:
    "The fields of a TrainConfig that the planner's step FLOPs read."
    def __init__(self, rho, guided=False):
        self.method, self.ratio_r_eq_t, self.num_classes = 'mf', rho, 10
        self.cfg_omega, self.cfg_kappa = (1.5, 0.3) if guided else (1.0, 0.0)


@pytest.mark.parametrize('name,kw', [('DiT-T/2', dict(hidden_size=96, depth=3, num_heads=3)),
                                     ('iMF-T/2', dict(hidden_size=96, depth=3, num_heads=3, head_depth=1))])
def test_planner_flops_match_flop_counter(name, kw):
    """The planner's forward FLOPs per sample (adaLN and embedders once per sample, not per token) equal torch's
    `FlopCounterMode` on a small network's forward (math attention, so the counter sees its matmuls); its FLOPs of a
    training sample (plain, JVP, guided, iMF) equal the counter's over a whole loss + backward within 5 %."""
    from torch.utils.flop_counter import FlopCounterMode
    from meanflow_nb.models import create_model, jvp_attention
    from meanflow_nb.loss import MeanFlowLoss
    from meanflow_nb.imf import IMFLoss
    from meanflow_nb.bench import model_flops, step_flops
    torch.manual_seed(0)
    net = create_model(name, input_size=16, in_channels=4, num_classes=10, **kw)
    imf = name.startswith('iMF')
    B = 4; g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(B, 4, 16, 16, generator=g), torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g)
    heads = (True, False) if imf else (True,)
    for head in heads:
        with FlopCounterMode(display=False) as fc, jvp_attention(), torch.no_grad():
            net(x, t, None, None, None, y, return_v=head) if imf else net(x, t, t, y)
        counted, planned = fc.get_total_flops() / B, model_flops(net, v_head=head)
        print(f'{name} (v-head {head}) forward: FlopCounterMode {counted / 1e6:.2f} MFLOP/sample, planner {planned / 1e6:.2f} ({planned / counted - 1:+.2%})')
        assert abs(planned / counted - 1) <= 0.02, (planned, counted)
    cases = [(0.5, False)] if imf else [(1.0, False), (0.0, False), (0.5, True)]
    for rho, guided in cases:
        cfg = _Cfg(rho, guided)
        lf = IMFLoss(num_classes=10, ratio_r_eq_t=rho) if imf else MeanFlowLoss(num_classes=10, ratio_r_eq_t=rho, cfg_omega=cfg.cfg_omega, cfg_kappa=cfg.cfg_kappa)
        d = lf.draw(B, x.shape[1:], torch.Generator().manual_seed(1))
        cfg.ratio_r_eq_t = float((d['r'] == d['t']).float().mean())           # the share this draw made
        with FlopCounterMode(display=False) as fc, jvp_attention():
            lf(net, x, y, **d)['loss'].backward()
        counted, planned = fc.get_total_flops() / B, step_flops(cfg, net)
        print(f'{name} training sample (r = t share {rho}, guided {guided}): FlopCounterMode {counted / 1e6:.2f} MFLOP, planner {planned / 1e6:.2f} ({planned / counted - 1:+.2%})')
        assert abs(planned / counted - 1) <= 0.05, (rho, guided, planned, counted)


def test_plan_console_script_exits_0_and_writes_json(tmp_path):
    "`mf-bench plan` as a console script: exit 0, the plan on stdout, nothing but the JSON note on stderr, `--json PATH` written."
    from meanflow_nb.bench import plan
    exe = Path(sys.executable).parent / 'mf-bench'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'meanflow_nb.bench']
    out = tmp_path / 'plan.json'
    r = subprocess.run(cmd + ['plan', '--preset', 'in256-mf-XL2', '--json', str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert 'DiT-XL/2' in r.stdout and 'GPU-hours' in r.stdout, r.stdout
    assert r.stderr.strip() == f'wrote {out}', r.stderr
    assert json.loads(out.read_text()) == json.loads(json.dumps(plan('in256-mf-XL2')))


@pytest.mark.parametrize('flag', ['--peak-tflops', '--gpu-mem-gb', '--mfu'])
@pytest.mark.parametrize('value', ['0', '-5', 'nan', 'inf'])
def test_plan_bad_number_is_one_line_exit_2(flag, value, capsys):
    "Zero, negative or non-finite TFLOP/s, memory or MFU: one line on stderr and exit 2 (no traceback, no plan)."
    from meanflow_nb.cli import cli_bench
    with pytest.raises(SystemExit) as ex: cli_bench(['plan', '--preset', 'in256-mf-XL2', f'{flag}={value}'])
    assert ex.value.code == 2
    err, out = capsys.readouterr().err, capsys.readouterr().out
    assert len(err.strip().splitlines()) == 1 and flag in err, err
