"""mf-sample / mf-fid as users run them: console scripts, 2 gloo ranks, kill -9 and resume, exit-2 errors,
the Inception (ImageNet) FID path on CPU with random weights, and the offline-download error."""
import json, os, signal, subprocess, sys, time, urllib.error
from pathlib import Path
from unittest import mock
import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # small models on 2 shared cores: extra threads only contend
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
BIN = Path(sys.executable).parent


def run(args, timeout=240):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def script(name):
    "A console script of the installed package (falls back to `python -m`)."
    p = BIN / name
    if p.exists(): return [str(p)]
    return [sys.executable, '-m', 'meanflow_nb.eval', {'mf-sample': 'sample', 'mf-fid': 'fid'}[name]]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A class-conditional digits run: 5 steps of DiT-T/2."
    from meanflow_nb.train import get_config, train
    out = tmp_path_factory.mktemp('run') / 'digits'
    train(get_config('digits', model='DiT-T/2', steps=5, sample_every=0, out=str(out)), progress=False)
    return out


def samples(folder):
    with np.load(Path(folder) / 'samples.npz') as f: return f['arr_0'], f['arr_1']


def test_two_gloo_ranks_give_the_same_samples_as_one(tiny_run, tmp_path):
    "N class-balanced uint8 samples; 2 torchrun ranks (python -m torch.distributed.run -m meanflow_nb.eval) give the same."
    from meanflow_nb.eval import sample_run
    from meanflow_nb.cli import cli_fid
    sample_run(tiny_run, tmp_path / 'one', n=30, nfe=2, shard_size=7, fmt='both', progress=False)
    x1, y1 = samples(tmp_path / 'one')
    assert x1.shape == (30, 8, 8, 1) and x1.dtype == np.uint8
    assert (y1 == np.arange(30) % 10).all()
    assert len(list((tmp_path / 'one' / 'png').glob('*.png'))) == 30
    r2 = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'meanflow_nb.eval',
              'sample', str(tiny_run), '-n', '30', '--nfe', '2', '--shard-size', '7', '--no-progress', '--out', str(tmp_path / 'two')])
    assert r2.returncode == 0, r2.stderr[-2000:]
    x2, y2 = samples(tmp_path / 'two')
    assert (x1 == x2).all() and (y1 == y2).all()
    assert x1.std() > 0  # not a constant image set: the comparison is not vacuous
    cli_fid([str(tmp_path / 'two' / 'samples.npz'), '--json', str(tmp_path / 'fid.json')])
    d = json.loads((tmp_path / 'fid.json').read_text())
    assert d['metric'] == 'digits-FID' and d['n'] == 30 and d['value'] > 1.0  # 5 training steps: far from digits


def test_kill_9_then_resume(tiny_run, tmp_path):
    "A sampling job killed with SIGKILL after some shards resumes, skips them, and ends with the same samples."
    from meanflow_nb.eval import sample_run
    common = [str(tiny_run), '--num-samples', '120', '--nfe', '20', '--shard-size', '10', '--batch-size', '10', '--no-progress']
    sample_run(tiny_run, tmp_path / 'ref', n=120, nfe=20, shard_size=10, batch_size=10, progress=False)  # uninterrupted, in-process
    out = tmp_path / 'killed'
    p = subprocess.Popen(script('mf-sample') + common + ['--out', str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / 'shards').glob('shard_?????.npz'))) < 2 and time.time() < deadline and p.poll() is None: time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out / 'COMPLETE').exists(), 'the job finished before it could be killed'
    r = run(script('mf-sample') + common + ['--out', str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info['resumed_shards'] >= 2
    assert (samples(out)[0] == samples(tmp_path / 'ref')[0]).all()


def test_user_errors_exit_2(tiny_run, tmp_path, capsys):
    "Missing run folder, corrupt checkpoints, bad N, unreadable samples: one line on stderr, exit code 2."
    from meanflow_nb.cli import cli_sample, cli_fid
    bad = tmp_path / 'bad'; bad.mkdir()
    (bad / 'ckpt_00000005.pt').write_bytes(b'not a checkpoint')
    (tmp_path / 'junk.npz').write_bytes(b'junk')
    cases = [(cli_sample, [str(tmp_path / 'missing')], 'does not exist'),
             (cli_sample, [str(tiny_run), '-n', '0'], '--num-samples must be'),
             (cli_sample, [str(tiny_run), '--num-samples', '-3'], '--num-samples must be'),
             (cli_sample, [str(tiny_run), '-n', 'ten'], 'invalid int'),
             (cli_sample, [str(bad)], 'corrupt'),
             (cli_sample, [str(tiny_run), '--ckpt', str(bad / 'ckpt_00000005.pt')], 'corrupt'),
             (cli_sample, [str(tiny_run), '--nfe', '0'], 'nfe must be'),
             (cli_fid, [str(tmp_path / 'junk.npz')], 'cannot read samples')]
    for fn, args, msg in cases:
        with pytest.raises(SystemExit) as ex: fn(args + (['--out', str(tmp_path / 'o')] if fn is cli_sample else []))
        err = capsys.readouterr().err
        assert ex.value.code == 2 and msg in err, (args, ex.value.code, err[-500:])
    for name in ('mf-sample', 'mf-fid'):  # and the installed console scripts
        r = run(script(name) + [str(tmp_path / 'missing')])
        assert r.returncode == 2 and 'missing' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-1000:]


@pytest.fixture(scope='module')
def small_inception(tmp_path_factory):
    "Random TF-Inception weights saved as a file, and the network shrunk to its 75-pixel minimum input (CPU speed)."
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inc
    with mock.patch('torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url', lambda *a, **k: None), \
         mock.patch.object(Inc, 'load_state_dict', lambda self, sd: None):
        torch.manual_seed(0); fe = Inc('inception-v3-compat', ['2048'])
    path = tmp_path_factory.mktemp('inc') / 'inception.pth'
    torch.save(fe.state_dict(), path)
    with mock.patch.object(Inc, 'INPUT_IMAGE_SIZE', 75): yield path


def test_imagenet_fid_path_runs_with_local_weights(small_inception, tmp_path):
    "The ImageNet path end to end: uint8 RGB samples -> Inception 2048-d statistics -> FID against a reference .npz."
    from meanflow_nb.eval import feature_stats, save_stats, INCEPTION, write_pngs
    from meanflow_nb.cli import cli_fid
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    s = feature_stats(x, INCEPTION, cuda=False, weights_path=small_inception, feature_layer='2048')
    assert s['mu'].shape == (2048,) and s['sigma'].shape == (2048, 2048) and s['n'] == 6
    save_stats(tmp_path / 'ref.npz', s)
    # the CLI on a PNG folder of the same images (uint8 files, read by torch-fidelity) against the reference
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    write_pngs(tmp_path / 'png', u8)
    cli_fid([str(tmp_path / 'png'), '--metric', 'fid', '--ref', str(tmp_path / 'ref.npz'),
             '--inception-weights', str(small_inception), '--json', str(tmp_path / 'r.json')])
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['metric'] == 'FID' and r['n'] == 6 and abs(r['value']) < 1e-6


def test_offline_inception_download_is_a_clear_error(tmp_path):
    "Without internet the Inception download fails with one ConfigError that says how to work offline."
    from meanflow_nb.eval import imagenet_fid, save_stats
    from meanflow_nb.core import ConfigError
    save_stats(tmp_path / 'ref.npz', {'mu': np.zeros(2048), 'sigma': np.eye(2048)})
    boom = mock.Mock(side_effect=urllib.error.URLError('Name or service not known'))
    with mock.patch('torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url', boom):
        with pytest.raises(ConfigError, match='inception-weights'):
            imagenet_fid(torch.zeros(2, 3, 8, 8), tmp_path / 'ref.npz', cuda=False)
    assert boom.called


def test_extractor_registers_and_orders_noise_blur_real():
    "Importing meanflow_nb.eval registers 'digits-classifier'; calculate_metrics then orders noise > blurred > real."
    import torch_fidelity
    import torchvision.transforms.functional as TF
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    import meanflow_nb.eval as E
    from meanflow_nb.data import digits_dataset
    assert FEATURE_EXTRACTORS_REGISTRY['digits-classifier'] is E.DigitsFeatureExtractor
    tr, te = digits_dataset('train').tensors[0][:600], digits_dataset('test').tensors[0]
    f = lambda a: torch_fidelity.calculate_metrics(input1=E.ImageTensorDataset(a), input2=E.ImageTensorDataset(tr),
                                                   feature_extractor='digits-classifier', fid=True, cuda=False,
                                                   verbose=False, cache=False, save_cpu_ram=True)['frechet_inception_distance']
    g = torch.Generator().manual_seed(0)
    real, blur, noise = f(te), f(TF.gaussian_blur(te, 5, 0.5)), f(torch.randn(te.shape, generator=g).clamp(-1, 1))
    assert noise > blur > real and real < 1.0, (real, blur, noise)


def test_latent_run_samples_decode_through_a_vae(tmp_path, capsys):
    "A latent-space run (tiny random VAE, 16 px ImageFolder): mf-sample decodes with --vae into uint8 RGB images."
    from meanflow_nb.data import make_shapes_folder, encode_folder, tiny_vae
    from meanflow_nb.train import get_config, train
    from meanflow_nb.cli import cli_sample
    vae = tiny_vae(); vae.save_pretrained(tmp_path / 'vae')
    make_shapes_folder(tmp_path / 'img', n_per_class=4)
    encode_folder(tmp_path / 'img', tmp_path / 'lat', vae, resolution=16, batch_size=8, shard_size=8, verbose=False)
    train(get_config(None, method='mf', model='DiT-T/2', data='latents', data_path=str(tmp_path / 'lat'), num_classes=2,
                     global_batch=8, steps=2, sample_every=0, out=str(tmp_path / 'run')), progress=False)
    cli_sample([str(tmp_path / 'run'), '-n', '5', '--vae', str(tmp_path / 'vae'), '--out', str(tmp_path / 's'), '--no-progress'])
    x, y = samples(tmp_path / 's')
    assert x.shape == (5, 16, 16, 3) and x.dtype == np.uint8 and (y == np.arange(5) % 2).all()
    with pytest.raises(SystemExit) as ex:  # without a usable VAE: exit 2, not a traceback
        cli_sample([str(tmp_path / 'run'), '-n', '5', '--vae', str(tmp_path / 'novae'), '--out', str(tmp_path / 's2')])
    assert ex.value.code == 2 and 'VAE' in capsys.readouterr().err


def test_imf_guidance_at_sampling_time(tmp_path):
    "An iMF run samples with the run's eval_* guidance, or with --omega/--t-min/--t-max passed on to sample_imf."
    import meanflow_nb.imf as imf
    from meanflow_nb.train import get_config, train
    from meanflow_nb.cli import cli_sample
    train(get_config('digits', method='imf', model='iMF-T/2', steps=3, sample_every=0, eval_omega=2.5, eval_t_min=0.3,
                     eval_t_max=0.7, out=str(tmp_path / 'run')), progress=False)
    with mock.patch.object(imf, 'sample_imf', wraps=imf.sample_imf) as spy:
        cli_sample([str(tmp_path / 'run'), '-n', '20', '--out', str(tmp_path / 'a'), '--no-progress'])
        assert spy.call_count == 1 and spy.call_args.kwargs == dict(omega=2.5, t_min=0.3, t_max=0.7)
        cli_sample([str(tmp_path / 'run'), '-n', '20', '--omega', '6', '--t-max', '0.9', '--out', str(tmp_path / 'b'), '--no-progress'])
        assert spy.call_count == 2 and spy.call_args.kwargs == dict(omega=6.0, t_min=0.3, t_max=0.9)
    meta = json.loads((tmp_path / 'b' / 'meta.json').read_text())
    assert meta['method'] == 'imf' and (meta['eval_omega'], meta['eval_t_min'], meta['eval_t_max']) == (6.0, 0.3, 0.9)
    assert samples(tmp_path / 'b')[0].shape == (20, 8, 8, 1)


def test_memorisation_check_flags_copies_not_fresh_digits():
    "Copies of training digits are flagged (ratio near 0, all close); held-out digits look like fresh ones (ratio 1)."
    from meanflow_nb.eval import memorisation_check, nn_distances
    from meanflow_nb.data import digits_dataset
    tr, te = digits_dataset('train').tensors[0], digits_dataset('test').tensors[0]
    a, b = tr[:700], tr[700:]                         # "train" = first half; the second half are fresh real digits
    fresh = memorisation_check(b[:300], train=a, test=te)
    copies = memorisation_check(a[:300] + 0.02, train=a, test=te)
    assert 0.8 < fresh['ratio'] < 1.25 and fresh['frac_close'] < 0.2, fresh
    assert copies['ratio'] < 0.1 and copies['frac_close'] == 1.0, copies
    d = nn_distances(te[:3], te[:3])                  # every image is its own nearest neighbour
    assert np.allclose(d, 0)
