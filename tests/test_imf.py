"""iMF through the trainer as users run it: torchrun with 2 gloo ranks, class-conditional digits, bad model choices."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
TOY = ['--preset', 'toy2d', '--method', 'imf', '--model', 'ToyIMF', '--baseline_fm', 'false', '--eval_samples', '200',
       '--no-progress', '--model_kwargs', '{"hidden": 64, "depth": 3}']


@pytest.fixture(autouse=True)
def one_thread():
    "In-process runs on one torch thread: two threads on two shared cores spin-wait."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(args, timeout=240):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def train_cmd(*args, nproc=0):
    pre = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc else []
    return [sys.executable, *pre, '-m', 'meanflow_nb.train', *args]


def final(out):
    return torch.load(sorted(Path(out).glob('ckpt_*.pt'))[-1], map_location='cpu', weights_only=True)


def test_imf_two_gloo_ranks_match_one_rank(tmp_path):
    "All randomness of an iMF step is in draw(): 2 ranks x 32 rows train the weights of 1 rank x 64 rows."
    common = TOY + ['--steps', '4', '--global_batch', '64', '--ckpt_every', '4', '--param_check_every', '2']
    r2 = run(train_cmd(*common, '--out', str(tmp_path / 'two'), nproc=2))
    assert r2.returncode == 0, r2.stderr[-2000:]
    m = json.loads((tmp_path / 'two' / 'metrics.json').read_text())
    assert m['method'] == 'imf' and m['steps'] == 4 and m['swd_1nfe'] == m['swd_1nfe']  # finite, not NaN
    r1 = run(train_cmd(*common, '--out', str(tmp_path / 'one')))
    assert r1.returncode == 0, r1.stderr[-2000:]
    a, b = final(tmp_path / 'one'), final(tmp_path / 'two')
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=0)
    assert any(json.loads(l)['loss_v'] > 0 for l in open(tmp_path / 'one' / 'log.jsonl'))


def test_imf_digits_class_conditional_two_ranks(tmp_path):
    "The guided path (labels, v_c and v_u, interval) on the tiny iMF DiT under 2 gloo ranks, with the sample grids."
    r = run(train_cmd('--preset', 'digits', '--method', 'imf', '--model', 'iMF-T/2', '--ratio_r_eq_t', '0.5', '--steps', '4',
                      '--global_batch', '32', '--sample_every', '0', '--ckpt_every', '4', '--eval_omega', '3.0',
                      '--eval_t_min', '0.2', '--eval_t_max', '0.8', '--no-progress', '--out', str(tmp_path / 'd'), nproc=2))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / 'd' / 'log.jsonl')]
    assert rows[-1]['step'] == 4 and all(k in rows[-1] for k in ('loss', 'loss_u', 'loss_v', 'weight', 'frac_u'))
    assert (tmp_path / 'd' / 'samples.png').exists()


@pytest.mark.parametrize('extra,needle', [
    (['--model', 'ToyMLP'], "method 'imf' needs an iMF network"),
    (['--model_kwargs', '{"v_head": false}'], 'needs a network with a v-head'),
])
def test_imf_bad_model_exits_2(tmp_path, capsys, extra, needle):
    from meanflow_nb.cli import cli_train
    with pytest.raises(SystemExit) as ex: cli_train([*TOY, '--steps', '2', '--global_batch', '16', *extra, '--out', str(tmp_path / 'bad')])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_imf_zero_parameter_variant_trains(tmp_path):
    "imf_v_head=False on a network without a v-head: the boundary u(z, t, t) is the tangent; the loss goes down."
    from meanflow_nb.train import train, get_config
    res = train(get_config('toy2d', method='imf', model='ToyIMF', model_kwargs={'hidden': 64, 'depth': 3, 'v_head': False},
                           imf_v_head=False, steps=40, global_batch=128, log_every=10, baseline_fm=False, eval_samples=200,
                           out=str(tmp_path / 'z')), progress=False)
    rows = [json.loads(l) for l in open(tmp_path / 'z' / 'log.jsonl')]
    assert res.metrics['method'] == 'imf' and rows[-1]['loss_u'] < rows[0]['loss_u']
