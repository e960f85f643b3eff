"""The trainer as users run it: console script, torchrun with 2 gloo ranks, kill -9 and --resume, bad input."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
TOY = ['--preset', 'toy2d', '--baseline_fm', 'false', '--eval_samples', '500', '--no-progress',
       '--model_kwargs', '{"hidden": 64, "depth": 3}']


def run(args, timeout=240, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def final_weights(out):
    ck = sorted(Path(out).glob('ckpt_*.pt'))[-1]
    return torch.load(ck, map_location='cpu', weights_only=True)


def torchrun(n, *args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', '-m', 'meanflow_nb.train', *args]


def test_two_gloo_ranks_match_one_rank(tmp_path):
    "2 ranks x 32 samples must train the same weights as 1 rank x 64 samples (manual gradient all-reduce)."
    common = TOY + ['--steps', '12', '--global_batch', '64', '--ckpt_every', '12', '--param_check_every', '4']
    r1 = run([sys.executable, '-m', 'meanflow_nb.train', *common, '--out', str(tmp_path / 'one')])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(torchrun(2, *common, '--out', str(tmp_path / 'two')))
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = final_weights(tmp_path / 'one'), final_weights(tmp_path / 'two')
    assert a['step'] == b['step'] == 12
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=0)
    # and training did move the weights away from each other's start: the comparison is not vacuous
    init = run([sys.executable, '-m', 'meanflow_nb.train', *TOY, '--steps', '1', '--global_batch', '64', '--lr', '1e-12',
                '--out', str(tmp_path / 'init')])
    assert init.returncode == 0, init.stderr[-2000:]
    c = final_weights(tmp_path / 'init')
    assert max((a['model'][k] - c['model'][k]).abs().max().item() for k in a['model']) > 1e-3


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    "A run killed with SIGKILL after a checkpoint and resumed ends with exactly the weights of an uninterrupted run."
    common = TOY + ['--steps', '40', '--global_batch', '128', '--ckpt_every', '10', '--keep_ckpts', '2']
    ref = run([sys.executable, '-m', 'meanflow_nb.train', *common, '--out', str(tmp_path / 'ref')])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / 'killed'
    p = subprocess.Popen([sys.executable, '-m', 'meanflow_nb.train', *common, '--out', str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(out.glob('ckpt_00000020.pt')) and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out / 'ckpt_00000040.pt').exists(), 'the run finished before it could be killed'
    res = run([sys.executable, '-m', 'meanflow_nb.train', *common, '--out', str(out), '--resume'])
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'resumed from step' in res.stderr
    a, b = final_weights(tmp_path / 'ref'), final_weights(out)
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=0, rtol=0)
    for k in a['ema'][0]: torch.testing.assert_close(a['ema'][0][k], b['ema'][0][k], atol=0, rtol=0)


def test_corrupt_checkpoint_falls_back_to_older(tmp_path):
    common = TOY + ['--steps', '20', '--global_batch', '64', '--ckpt_every', '10']
    out = tmp_path / 'run'
    assert run([sys.executable, '-m', 'meanflow_nb.train', *common, '--out', str(out)]).returncode == 0
    newest = out / 'ckpt_00000020.pt'
    newest.write_bytes(newest.read_bytes()[:500])
    res = run([sys.executable, '-m', 'meanflow_nb.train', *common, '--steps', '30', '--out', str(out), '--resume'])
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'corrupt or truncated' in res.stderr and 'resumed from step 10' in res.stderr


@pytest.mark.parametrize('args,needle', [
    (['--preset', 'nope'], 'unknown preset'),
    (['--preset', 'toy2d', '--steps', '-5'], 'non-negative'),
    (['--preset', 'toy2d', '--ratio_r_eq_t', '1.5'], 'ratio_r_eq_t must be in [0, 1]'),
    (['--preset', 'toy2d', '--method', 'ddim'], 'unknown method'),
    (['--preset', 'toy2d', '--model', 'DiT-Q/9', '--data', 'digits'], 'unknown model'),
    (['--preset', 'digits', '--data', 'imagefolder'], 'needs --data_path'),
    (['--preset', 'digits', '--data', 'imagefolder', '--data_path', '/no/such/folder'], 'does not exist'),
    (['--preset', 'toy2d', '--out', '/proc/forbidden/run'], 'cannot write to the run folder'),
    (['--preset', 'digits', '--model_kwargs', '{"patch_size": 3}', '--steps', '1'], 'divisible'),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    args = args if '--out' in args else args + ['--out', str(tmp_path / 'o')]
    r = run(['mf-train', *args], timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert needle in r.stderr, r.stderr[-1500:]
    assert 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_batch_not_divisible_by_world_size(tmp_path):
    r = run(torchrun(2, *TOY, '--steps', '2', '--global_batch', '63', '--out', str(tmp_path / 'o')))
    assert r.returncode != 0
    assert 'not divisible by the world size 2' in r.stderr


def test_nan_loss_stops_with_the_step(tmp_path):
    "A diverging run stops with the step number and exit 1; the checkpoint on disk is from before the NaN."
    out = tmp_path / 'nan'
    r = run(['mf-train', *TOY, '--steps', '200', '--lr', '1e30', '--global_batch', '64', '--ckpt_every', '1', '--out', str(out)])
    assert r.returncode == 1, (r.returncode, r.stderr[-1500:])
    assert 'non-finite loss' in r.stderr and 'at step' in r.stderr and 'Traceback' not in r.stderr
    for ck in out.glob('ckpt_*.pt'):
        st = torch.load(ck, map_location='cpu', weights_only=True)
        assert all(torch.isfinite(v).all() for v in st['model'].values())


def test_dead_rank_makes_the_job_fail_not_hang(tmp_path):
    "One rank dies mid-run: torchrun must exit non-zero well before the test's timeout."
    script = tmp_path / 'die.py'
    script.write_text(
        "import os, sys, torch\n"
        "from meanflow_nb import dist\n"
        "dist.init_distributed(timeout_s=20)\n"
        "if dist.get_rank() == 1: os._exit(3)\n"
        "x = torch.ones(1); dist.all_reduce_mean(x)\n")
    t0 = time.time()
    r = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)], timeout=120)
    assert r.returncode != 0
    assert time.time() - t0 < 100


def test_main_job_run_folder(tmp_path):
    "The README's first command, shrunk: the run folder has samples.png, metrics.json (10k samples) and checkpoints."
    out = tmp_path / 'toy2d'
    r = run(['mf-train', '--preset', 'toy2d', '--steps', '30', '--no-progress', '--out', str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('swd_1nfe', 'swd_2nfe', 'swd_fm100', 'energy_1nfe'): assert k in m and m[k] == m[k], k
    assert json.loads((out / 'config.json').read_text())['eval_samples'] >= 10_000
    assert (out / 'samples.png').stat().st_size > 10_000
    assert (out / 'ckpt_00000030.pt').exists() and (out / 'baseline_fm' / 'ckpt_00000030.pt').exists()
    st = torch.load(out / 'ckpt_00000030.pt', weights_only=True)
    assert set(st) >= {'step', 'model', 'ema', 'opt', 'config'}


def test_help_lists_presets():
    r = run(['mf-train', '--help'])
    assert r.returncode == 0 and 'toy2d' in r.stdout and '--ratio_r_eq_t' in r.stdout
