"""Paper-scale machinery on the CPU: preemption and resume, SLURM launch without torchrun, cross-rank parameter check,
overlapped all-reduce and micro-batches on 2 gloo ranks (tiny toy runs)."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
TOY = ['--preset', 'toy2d', '--baseline_fm', 'false', '--eval_samples', '200', '--no-progress',
       '--model_kwargs', '{"hidden": 32, "depth": 2}']
EXIT_PREEMPTED = 75


def run(args, timeout=300, env=ENV):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def final(out):
    return torch.load(sorted(Path(out).glob('ckpt_*.pt'))[-1], map_location='cpu', weights_only=True)


def one(*args): return [sys.executable, '-m', 'meanflow_nb.train', *args]


def torchrun(n, *args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', '-m', 'meanflow_nb.train', *args]


def assert_same(a, b, atol=0.0):
    assert a['step'] == b['step']
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=atol, rtol=0)
    if atol == 0:
        for k in a['ema'][0]: torch.testing.assert_close(a['ema'][0][k], b['ema'][0][k], atol=0, rtol=0)


@pytest.mark.parametrize('world', [1, 2])
def test_sigterm_checkpoints_exits_75_and_resume_is_bit_identical(tmp_path, world):
    "SIGTERM mid-run: the step finishes, a checkpoint is written, exit 75; --resume ends with the uninterrupted weights."
    common = TOY + ['--steps', '150', '--global_batch', '32', '--ckpt_every', '1000', '--log_every', '1']
    launch = (lambda *a: one(*a)) if world == 1 else (lambda *a: torchrun(2, *a))
    ref = run(launch(*common, '--out', str(tmp_path / 'ref')))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / 'pre'
    p = subprocess.Popen(launch(*common, '--out', str(out)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    log, deadline = out / 'log.jsonl', time.time() + 240
    while time.time() < deadline and p.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGTERM)                                  # torchrun forwards it to its workers
    err = p.communicate(timeout=120)[1]
    cks = sorted(out.glob('ckpt_*.pt'))
    assert len(cks) == 1 and 'ckpt_00000150' not in cks[0].name, (cks, err[-1500:])   # stopped early, with a checkpoint
    if world == 1: assert p.returncode == EXIT_PREEMPTED, (p.returncode, err[-1500:])
    else: assert p.returncode != 0, err[-1500:]                  # torchrun reports its own signal; the workers exit 75
    assert 'rerun with --resume' in err
    res = run(launch(*common, '--out', str(out), '--resume'))
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same(final(tmp_path / 'ref'), final(out))


def test_param_check_fires_on_a_perturbed_rank(tmp_path):
    "Two ranks with identical weights pass the fingerprint check; nudging one weight of rank 1 by 1e-7 makes it fire."
    script = tmp_path / 'perturb.py'
    script.write_text(
        "import sys, torch\n"
        "from meanflow_nb import dist\n"
        "from meanflow_nb.train import _check_params, RunError\n"
        "from meanflow_nb.models import ToyMLP\n"
        "dist.init_distributed(timeout_s=60)\n"
        "torch.manual_seed(dist.get_rank()); m = ToyMLP(hidden=16, depth=2)\n"
        "dist.broadcast_params(m); _check_params(m, 0)\n"
        "if dist.get_rank() == 1:\n"
        "    with torch.no_grad(): m.net[0].weight[3, 1] += 1e-7\n"
        "try: _check_params(m, 5, 'after the resume'); print('NO FIRE')\n"
        "except RunError as ex: print('FIRED', ex)\n"
        "dist.cleanup_distributed()\n")
    r = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('FIRED') == 2 and 'NO FIRE' not in r.stdout, r.stdout
    assert 'rank(s) [1] disagree with rank 0' in r.stdout and 'at step 5 after the resume' in r.stdout


PAIR = TOY + ['--steps', '8', '--global_batch', '48', '--ckpt_every', '8', '--param_check_every', '2']


@pytest.fixture(scope='module')
def one_rank(tmp_path_factory):
    "The 1-rank run every 2-rank launch below is compared with (one process, no micro-batches)."
    out = tmp_path_factory.mktemp('one_rank') / 'one'
    r = run(one(*PAIR, '--micro_batch', '0', '--out', str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    return final(out)


@pytest.mark.parametrize('extra', [['--overlap_sync', 'false', '--micro_batch', '8'], ['--overlap_sync', 'true', '--micro_batch', '12', '--bucket_mb', '0.001']])
def test_two_ranks_equal_one_rank_flat_and_overlapped(tmp_path, one_rank, extra):
    "Micro-batches with the flat all-reduce, and with bucketed all-reduces from grad hooks: 2 ranks = 1 rank."
    r2 = run(torchrun(2, *PAIR, *extra, '--out', str(tmp_path / 'two')))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert_same(one_rank, final(tmp_path / 'two'), atol=1e-5)


def test_srun_style_launch_without_torchrun(tmp_path, one_rank):
    """Two plain processes with only SLURM's variables form one job (rank, world, master from SLURM): they train what
    torchrun's 2 ranks train, so they end at the 1-rank weights (to the all-reduce's rounding, as above)."""
    ps = []
    for rank in range(2):
        env = {k: v for k, v in ENV.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST='localhost',
                   SLURM_JOB_ID=str(os.getpid() % 900 + 17), SLURM_NTASKS_PER_NODE='2')
        ps.append(subprocess.Popen(one(*PAIR, '--out', str(tmp_path / 'slurm')), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in ps]
    assert all(p.returncode == 0 for p in ps), [o[1][-1500:] for o in outs]
    assert '"out"' in outs[0][0] and '"out"' not in outs[1][0], outs   # one job: only rank 0 (SLURM_PROCID 0) reports
    assert_same(one_rank, final(tmp_path / 'slurm'), atol=1e-5)


def test_compiled_step_matches_eager():
    """compile_step: loss, JVP and backward traced by torch.compile give the eager loss and gradients (tiny MLP, CPU).
    The aot_eager backend runs Dynamo and AOT autograd on the step but generates no kernels (inductor's C++ build takes
    minutes on a 2-core machine; mf-bench times inductor, tests/gpu checks it on CUDA)."""
    from meanflow_nb.models import ToyMLP
    from meanflow_nb.loss import MeanFlowLoss
    from meanflow_nb.train import compiled_step
    torch.manual_seed(0)
    net, lf = ToyMLP(hidden=16, depth=1), MeanFlowLoss(ratio_r_eq_t=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g); d = lf.draw(32, (2,), g)
    out = lf(net, x, None, **d); out['loss'].backward(); g0 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    st = compiled_step('aot_eager')(net, lf, x, None, d, 0, 1, 1.0)
    torch.testing.assert_close(st['loss'], out['loss'].detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(g0, net.parameters()): torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    assert max(a.abs().max() for a in g0) > 1e-4


def _unzero(net, seed=0):
    "Give the zero-initialised parameters (adaLN-zero, gates, output) small random values, so every one gets a gradient."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if (p == 0).all(): p.normal_(0, 0.02, generator=g)
    return net


def _compiled_vs_eager(net, lf, x, y, balanced: bool):
    """Two `train_step`s, eager on a copy and with `compiled_step('aot_eager')` on the original, on the same draws:
    the loss and the gradients of the first step and the weights after the second agree to float tolerance."""
    import copy
    from meanflow_nb.schedules import balanced_split
    from meanflow_nb.train import compiled_step, train_step
    ref, sf = copy.deepcopy(net), compiled_step('aot_eager')
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, net)]
    for k in range(2):
        g = torch.Generator().manual_seed(10 + k)
        with balanced_split(1 if balanced else 0): d = lf.draw(len(x), x.shape[1:], g, None, 3, 10)
        assert ('eq_host' in d) == (balanced and not hasattr(lf, 'omega_max'))   # MF / Kim: the host split
        se = train_step(ref, lf, opts[0], x, y, d, 3, 10)               # the same step index: one compilation
        sc = train_step(net, lf, opts[1], x, y, d, 3, 10, step_fn=sf)
        if k == 0:
            assert set(se) == set(sc)
            for key in se: assert abs(se[key] - sc[key]) <= 1e-5 * abs(se[key]) + 1e-6, (key, se[key], sc[key])
            gs = [(a.grad, b.grad) for a, b in zip(ref.parameters(), net.parameters())]
            for a, b in gs: torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
            assert all(bool(a.abs().max() > 0) for a, _ in gs)              # every parameter is trained
    for a, b in zip(ref.parameters(), net.parameters()): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compiled_step_imf_matches_eager():
    "compile_step covers iMF's compound loss (own-velocity JVP, v-head, guidance conditioning) on iMF-T/2."
    from meanflow_nb.models import create_model
    from meanflow_nb.imf import IMFLoss
    torch.manual_seed(0)
    net = _unzero(create_model('iMF-T/2', input_size=8, in_channels=1, num_classes=10))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    _compiled_vs_eager(net, IMFLoss(num_classes=10), x, y, balanced=True)


def test_compiled_step_kim_matches_eager():
    "compile_step covers Kim et al.'s loss (MinSNR, progressive gap weight) with trained-in CFG and the host r = t split."
    from meanflow_nb.models import ToyMLP
    from meanflow_nb.kim import KimLoss
    torch.manual_seed(0)
    net = ToyMLP(hidden=32, depth=2, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g)
    lf = KimLoss(num_classes=3, ratio_r_eq_t=0.5, cfg_omega=1.0, cfg_kappa=0.5, accel='minsnr')
    _compiled_vs_eager(net, lf, x, y, balanced=True)
