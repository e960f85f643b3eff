"""The ImageNet walk-through (nbs/14_imagenet.ipynb), every step run end to end at tiny scale on CPU:
a generated ImageFolder, a random-init SD-VAE-shaped AutoencoderKL, latents with 2 ranks, torchrun training of
MF, Kim et al. and iMF on DiT-T/2 / iMF-T/2 with 2 gloo ranks, sampling with 2 ranks and decoding, FID's offline error."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
TR = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
BIN = Path(sys.executable).parent  # console scripts are python files: torchrun runs them directly


def sh(args, timeout=300):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, f'{args}\n{r.stdout[-1500:]}\n' + '\n'.join(l for l in r.stderr.splitlines() if 'arn' not in l)[:4000]
    return r


@pytest.fixture(scope='module')
def latents(tmp_path_factory):
    from meanflow_nb.data import make_shapes_folder, tiny_vae
    d = tmp_path_factory.mktemp('in256')
    make_shapes_folder(d / 'train', n_per_class=12)
    tiny_vae().save_pretrained(d / 'vae')
    # step 1: latents, split across 2 ranks (on GPUs: the real SD-VAE and --resolution 256)
    sh(TR + [str(BIN / 'mf-latents'), '--data', str(d / 'train'), '--out', str(d / 'lat'), '--vae', str(d / 'vae'),
             '--resolution', '16', '--shard-size', '8', '--batch-size', '4', '--quiet'])
    meta = json.loads((d / 'lat' / 'meta.json').read_text())
    assert meta['n'] == 24
    return d


@pytest.mark.parametrize('preset,model', [('in256-mf-B4', 'DiT-T/2'), ('in256-kim-XL2', 'DiT-T/2'), ('in256-imf-B2', 'iMF-T/2')])
def test_train_sample_decode(latents, preset, model, tmp_path):
    run = tmp_path / 'run'
    # step 2: torchrun training with the paper's preset, shrunk: tiny model, 4 steps, 2 gloo ranks
    sh(TR + ['-m', 'meanflow_nb.train', '--preset', preset, '--model', model, '--data_path', str(latents / 'lat'),
             '--global_batch', '8', '--steps', '4', '--warmup_steps', '2', '--num_workers', '0', '--ckpt_every', '2',
             '--sample_every', '0', '--eval_samples', '8', '--no-progress', '--out', str(run)])
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['method'] == {'in256-mf-B4': 'mf', 'in256-kim-XL2': 'kim', 'in256-imf-B2': 'imf'}[preset]
    assert (run / 'ckpt_00000004.pt').exists()
    # step 3: class-balanced sampling with 2 ranks, decoded through the VAE to images
    out = tmp_path / 'samples'
    sh(TR + [str(BIN / 'mf-sample'), str(run), '-n', '12', '--nfe', '1', '--vae', str(latents / 'vae'),
             '--out', str(out), '--no-progress'])
    arr = np.load(out / 'samples.npz')['arr_0']
    assert arr.shape[0] == 12 and arr.dtype == np.uint8 and arr.shape[-1] == 3


def test_fid_needs_inception_weights_offline(tmp_path):
    "Step 4: FID-50K against the ADM reference; offline, without Inception weights, one clear line and exit 2."
    np.savez(tmp_path / 's.npz', arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    r = subprocess.run(['mf-fid', str(tmp_path / 's.npz'), '--metric', 'fid', '--ref', str(tmp_path / 'ref.npz'),
                        '--inception-weights', str(tmp_path / 'missing.pth')], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-1500:]
