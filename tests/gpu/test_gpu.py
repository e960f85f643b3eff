"""The GPU check of the paper-scale path, ready to run: `pytest tests/gpu -q -rP` on one CUDA GPU (a few minutes;
`-rP` prints what the passing checks measured).
Skipped without CUDA. It checks that TF32 and bf16 take effect, that the compiled step equals eager, that the
NCCL collectives work with 1 rank, that micro-batches equal the un-split step, that the planner's activation
memory is within 25 % of the measured peak for DiT-B/2 and iMF-B/2, and that the non-log training steps of MF, Kim
and iMF make no host sync."""
import os, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
DEV = torch.device('cuda', 0)


def _mm_err(tf32: bool) -> float:
    from meanflow_nb.train import set_precision
    set_precision(tf32, DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    a, b = torch.randn(1024, 1024, device=DEV, generator=g), torch.randn(1024, 1024, device=DEV, generator=g)
    return float(((a @ b).double() - a.double() @ b.double()).abs().max())


def test_tf32_and_bf16_take_effect():
    "TF32 on: fp32 matmuls lose precision (10 mantissa bits); off: they do not. bf16 autocast makes bf16 activations."
    e32, etf = _mm_err(False), _mm_err(True)
    print(f'max matmul error: fp32 {e32:.2e}, tf32 {etf:.2e}')
    assert etf > 10 * e32, (etf, e32)
    from meanflow_nb.models import create_model
    from meanflow_nb.train import set_precision
    set_precision(True, DEV)
    m = create_model('DiT-T/2', input_size=8, in_channels=4, num_classes=10).to(DEV)
    seen = []
    m.blocks[0].mlp[0].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    x, t = torch.randn(4, 4, 8, 8, device=DEV), torch.rand(4, device=DEV)
    with torch.autocast('cuda', dtype=torch.bfloat16): m(x, t, t)
    assert seen == [torch.bfloat16], seen


def _dit_step_setup(seed=0, n=16):
    from meanflow_nb.models import create_model
    from meanflow_nb.loss import MeanFlowLoss
    torch.manual_seed(seed)
    m = create_model('DiT-T/2', input_size=8, in_channels=4, num_classes=10).to(DEV)
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all(): p.normal_(0, 0.02)
    lf = MeanFlowLoss(num_classes=10, ratio_r_eq_t=0.5, cfg_omega=1.0, cfg_kappa=0.5)
    g = torch.Generator(device=DEV).manual_seed(seed)
    x, y = torch.randn(n, 4, 8, 8, device=DEV, generator=g), torch.randint(0, 10, (n,), device=DEV, generator=g)
    return m, lf, x, y, lf.draw(n, x.shape[1:], g, DEV)


def test_compiled_step_equals_eager():
    from meanflow_nb.train import compiled_step, set_precision
    set_precision(False, DEV)
    m, lf, x, y, d = _dit_step_setup()
    out = lf(m, x, y, **d); out['loss'].backward(); g0 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(); st = compiled_step()(m, lf, x, y, d, 0, 1, 1.0)
    torch.testing.assert_close(st['loss'], out['loss'].detach(), rtol=1e-4, atol=1e-5)
    for a, p in zip(g0, m.parameters()): torch.testing.assert_close(p.grad, a, rtol=1e-3, atol=1e-5)


def test_nccl_with_one_rank(tmp_path):
    "An NCCL process group of 1: overlapped bucketed sync, flat sync, parameter fingerprint and the gloo control channel."
    script = tmp_path / 'nccl1.py'
    script.write_text(
        "import torch, torch.distributed as td\n"
        "from meanflow_nb import dist\n"
        "td.init_process_group('nccl', device_id=torch.device('cuda', 0))\n"
        "assert dist.is_dist() and td.get_backend() == 'nccl'\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()\n"
        "gs = dist.GradSync(m, bucket_mb=0.01); assert len(gs.handles) == 4\n"
        "m(torch.randn(5, 64, device='cuda')).sum().backward(); g = [p.grad.clone() for p in m.parameters()]\n"
        "gs.finish(); assert all(torch.equal(a, p.grad) for a, p in zip(g, m.parameters()))\n"
        "dist.sync_gradients(m); assert all(torch.equal(a, p.grad) for a, p in zip(g, m.parameters()))\n"
        "assert dist.params_agree(m) == [] and dist.any_rank(True, False) == [True, False]\n"
        "print('NCCL OK'); dist.cleanup_distributed()\n")
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', str(script)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'NCCL OK' in r.stdout, r.stderr[-3000:]


def test_micro_batch_equivalence_on_gpu():
    from meanflow_nb.train import train_step, set_precision
    set_precision(False, DEV)
    ws = {}
    for micro in (0, 4):
        m, lf, x, y, d = _dit_step_setup()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for k in range(3): train_step(m, lf, opt, x, y, d, k, 3, micro_batch=micro)
        ws[micro] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(ws[0], ws[4]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _measured_bytes_per_sample(name: str, kind: str, bf16: bool, batches=(8, 24)) -> tuple:
    from meanflow_nb.models import create_model, iMFDiT
    from meanflow_nb.loss import MeanFlowLoss
    from meanflow_nb.imf import IMFLoss
    from meanflow_nb.plan import model_arch as _arch
    torch.manual_seed(0)
    m = create_model(name, input_size=32, in_channels=4, num_classes=1000).to(DEV)
    lf = (IMFLoss if isinstance(m, iMFDiT) else MeanFlowLoss)(num_classes=1000, ratio_r_eq_t=1.0 if kind == 'fm' else 0.0)
    peaks = []
    for B in batches:
        g = torch.Generator(device=DEV).manual_seed(0)
        x, y = torch.randn(B, 4, 32, 32, device=DEV, generator=g), torch.randint(0, 1000, (B,), device=DEV, generator=g)
        d = lf.draw(B, x.shape[1:], g, DEV)
        for _ in range(2):                                                   # the second run: gradients already allocated
            m.zero_grad(set_to_none=False); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(DEV)
            base = torch.cuda.memory_allocated(DEV)
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16), warnings.catch_warnings():
                warnings.simplefilter('ignore'); lf(m, x, y, **d)['loss'].backward()
            torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated(DEV) - base)
    return (peaks[1] - peaks[0]) / (batches[1] - batches[0]), _arch(m)


@pytest.mark.parametrize('name,kind,bf16', [('DiT-B/2', 'fm', False), ('DiT-B/2', 'fm', True), ('DiT-B/2', 'jvp', False), ('DiT-B/2', 'jvp', True),
                                            ('iMF-B/2', 'jvp', False), ('iMF-B/2', 'jvp', True)])
def test_planner_memory_within_25_percent(name, kind, bf16):
    from meanflow_nb.plan import activation_bytes
    from meanflow_nb.train import set_precision
    set_precision(True, DEV)
    meas, arch = _measured_bytes_per_sample(name, kind, bf16)
    pred = activation_bytes(arch, kind, bf16)
    print(f'{name} {kind} bf16={bf16}: measured {meas / 2**20:.1f} MB/sample, planned {pred / 2**20:.1f} MB/sample ({pred / meas - 1:+.1%})')
    assert abs(pred / meas - 1) <= 0.25, (meas, pred)


@pytest.mark.parametrize('case', ['mf', 'kim-minsnr', 'imf'])
def test_no_host_sync_outside_log_steps_on_gpu(tmp_path, monkeypatch, case):
    """A 5-step digits run (balanced r = t split; only the last step logs and checkpoints) whose steps 2-4, from the
    batch on the GPU to the next batch, run under `torch.cuda.set_sync_debug_mode('error')`: any host sync raises
    (step 1 is left out: first-call set-up). The CPU twin, with a count of host reads, is tests/test_syncs.py."""
    import meanflow_nb.train as T
    cases = {'mf': dict(method='mf', model='DiT-T/2'), 'kim-minsnr': dict(method='kim', kim_accel='minsnr', model='DiT-T/2'),
             'imf': dict(method='imf', model='iMF-T/2', ratio_r_eq_t=0.5)}
    steps, state = 5, dict(fetched=0)
    cfg = T.get_config('digits', **cases[case], global_batch=32, steps=steps, log_every=steps, ckpt_every=steps,
                       sample_every=0, ckpt_every_minutes=0.0, r_eq_t_split='balanced', out=str(tmp_path / case))
    class Meter(T._Meter):
        def data(self):
            w = super().data()
            class W:
                def __enter__(s): torch.cuda.set_sync_debug_mode(0); return w.__enter__()
                def __exit__(s, *e):
                    r = w.__exit__(*e); state['fetched'] += 1
                    if 1 < state['fetched'] < steps: torch.cuda.set_sync_debug_mode('error')
                    return r
            return W()
    monkeypatch.setattr(T, '_Meter', Meter)
    try: T.train(cfg, progress=False, quiet=True)
    finally: torch.cuda.set_sync_debug_mode(0)
    assert state['fetched'] == steps
