"""What the notebook cannot test well: `mf-latents` as a subprocess (errors, resuming) and under `torchrun` with 2 ranks.

Run: `pytest -q tests/test_data.py` (about 30 s on 2 CPU cores).
"""
import os, sys, json, shutil, subprocess, textwrap, warnings
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from meanflow_nb.core import ConfigError
from meanflow_nb.data import (digits_dataset, make_loader, infinite_batches, build_dataset, make_shapes_folder,
                              scan_image_folder, ImageFolderDataset, tiny_vae, encode_folder, LatentDataset,
                              normalize_latents, denormalize_latents, eval_labels, LATENT_NORMS)

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}  # tiny models: one thread is fastest
torch.set_num_threads(1)  # in-process too: on a shared 2-core machine two threads can be 100x slower
CLI = [sys.executable, '-c', 'from meanflow_nb.cli import cli_latents; cli_latents()']


def run(args, cmd=CLI, **kw):
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=300, **kw)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A folder of 16 shapes with one junk file, and a tiny random VAE saved to a directory."
    d = tmp_path_factory.mktemp('data')
    folder = make_shapes_folder(d / 'img', n_per_class=8, size=(40, 72))
    (folder / 'disc' / 'junk.png').write_bytes(b'not a png')
    tiny_vae(seed=3).save_pretrained(d / 'vae')
    return d, folder, d / 'vae'


def latents_args(folder, vae, out, *extra):
    return ['--data', folder, '--out', out, '--vae', vae, '--resolution', 32, '--batch-size', 3,
            '--shard-size', 4, '--num-workers', 0, '--quiet', *extra]


def same_shards(a, b, n):
    for s in range(n):
        ta, tb = load_file(Path(a) / f'shard_{s:05d}.safetensors'), load_file(Path(b) / f'shard_{s:05d}.safetensors')
        assert ta.keys() == tb.keys()
        assert torch.equal(ta['y'], tb['y']) and torch.equal(ta['index'], tb['index'])
        for k in ('mean', 'std'): torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_digits_and_loader():
    tr, te = digits_dataset('train', seed=3), digits_dataset('test', seed=3)
    assert len(tr) + len(te) == 1797 and tr.tensors[0].shape[1:] == (1, 8, 8)
    assert torch.equal(te.tensors[1], digits_dataset('test', seed=3).tensors[1])
    x, y = next(infinite_batches(make_loader(tr, 64)))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long and -1 <= x.min() and x.max() <= 1
    with pytest.raises(ConfigError, match='valid: digits, mnist, cifar10, imagefolder, latents'): build_dataset('svhn')


def test_imagefolder_counts_skips(setup):
    _, folder, _ = setup
    with pytest.warns(UserWarning, match=r'kept 16 images, skipped 1 files \(1 unreadable\): disc/junk.png'):
        ds = ImageFolderDataset(folder, 24)
    assert len(ds) == 16 and ds[0][0].shape == (3, 24, 24)
    with pytest.raises(ConfigError, match='strict scan failed'): scan_image_folder(folder, strict=True)


def test_normalisation_round_trip():
    z = torch.randn(8, 4, 5, 5) * 4 + 1
    for m in LATENT_NORMS:
        torch.testing.assert_close(denormalize_latents(normalize_latents(z, m), m), z, rtol=0, atol=1e-5)
    assert eval_labels(2000, num_classes=1000).bincount().tolist() == [2] * 1000


def cli(args, capsys):
    "Run `mf-latents` in this process: (exit code, stdout, stderr lines)."
    from meanflow_nb.cli import cli_latents
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try: cli_latents([str(a) for a in args])
        except SystemExit as ex: code = ex.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_cli_errors_exit_2_with_one_line(setup, tmp_path, capsys):
    d, folder, vae = setup
    (tmp_path / 'empty').mkdir()
    cases = [(latents_args(tmp_path / 'nowhere', vae, tmp_path / 'o1'), 'does not exist'),
             (latents_args(tmp_path / 'empty', vae, tmp_path / 'o2'), 'is empty'),
             (latents_args(folder, tmp_path / 'no_vae', tmp_path / 'o3'), 'VAE directory'),
             (latents_args(folder, vae, tmp_path / 'o4', '--resolution', 31), 'not a multiple')]
    for args, msg in cases:
        code, _, err = cli(args, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith('error:') and msg in err[0], (code, err)


def test_cli_resume_and_refuse_other_run(setup, tmp_path, capsys):
    d, folder, vae = setup
    out = tmp_path / 'lat'
    code, stdout, err = cli(latents_args(folder, vae, out), capsys); assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert (res['n'], res['n_shards'], res['shards_written']) == (16, 4, 4)
    ref = tmp_path / 'ref'; shutil.copytree(out, ref)
    # an interrupted run: the last shard missing, a half-written .tmp in its place
    (out / 'shard_00003.safetensors').unlink(); (out / 'shard_00003.safetensors.tmp').write_bytes(b'partial')
    code, stdout, err = cli(latents_args(folder, vae, out), capsys); assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])['shards_written'] == 1
    assert not list(out.glob('*.tmp'))
    same_shards(out, ref, 4)
    # the same output directory with another resolution is refused, in one line
    code, _, err = cli(latents_args(folder, vae, out, '--resolution', 16), capsys)
    assert code == 2 and len(err) == 1 and 'holds latents of another run' in err[0], err


def test_posterior_sampling_statistics(setup, tmp_path):
    d, folder, _ = setup
    vae = tiny_vae(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        encode_folder(folder, tmp_path / 'lat', vae, resolution=32, shard_size=16, vae_id='t', verbose=False)
    ds = LatentDataset(tmp_path / 'lat', 'none', vae='t', resolution=32)
    t = load_file(tmp_path / 'lat' / 'shard_00000.safetensors')
    torch.manual_seed(0)
    draws = torch.stack([ds[5][0] for _ in range(3000)])
    se = t['std'][5] / 3000 ** 0.5
    assert ((draws.mean(0) - t['mean'][5]).abs() < 5 * se).all()
    torch.testing.assert_close(draws.std(0) / t['std'][5], torch.ones_like(se), rtol=0, atol=0.07)
    # MF scaling of a fresh draw is a draw from the scaled posterior
    mf = torch.stack([LatentDataset(tmp_path / 'lat', 'mf')[5][0] for _ in range(200)]).mean(0)
    assert ((mf - 0.18215 * t['mean'][5]).abs() < 0.18215 * 5 * t['std'][5] / 200 ** 0.5).all()


def console_script():
    exe = shutil.which('mf-latents') or str(Path(sys.executable).parent / 'mf-latents')
    return [exe] if Path(exe).exists() else CLI


def test_subprocess_error_exit_2(tmp_path):
    r = run(['--data', tmp_path / 'nowhere', '--out', tmp_path / 'o'], cmd=console_script())
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f'error: image folder {tmp_path / "nowhere"} does not exist or is not a directory']


DIST_SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch.utils.data import TensorDataset
    from meanflow_nb import dist
    from meanflow_nb.data import make_loader, set_epoch, digits_dataset
    from meanflow_nb.cli import cli_latents
    dist.init_distributed('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    ids = TensorDataset(torch.arange(40), torch.zeros(40, dtype=torch.long))
    dl = make_loader(ids, batch_size=4, seed=5, drop_last=False)
    for epoch in range(2):
        set_epoch(dl, epoch)
        mine = torch.cat([x for x, _ in dl])
        both = dist.all_gather_cat(mine)                  # rank 0's 20 indices, then rank 1's
        assert sorted(both.tolist()) == list(range(40)), both   # disjoint and covering
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(5 + epoch))
        assert torch.equal(mine, perm[rank::2])           # a share of the world-size-1 epoch
    x, y = next(iter(make_loader(digits_dataset('train'), batch_size=32)))
    assert x.shape == (32, 1, 8, 8)
    print(f'rank {rank} loader ok', flush=True)
    cli_latents(sys.argv[1:])                            # the process group is already up: mf-latents reuses it
''')


def test_torchrun_two_ranks(setup, tmp_path):
    d, folder, vae = setup
    script = tmp_path / 'two_ranks.py'; script.write_text(DIST_SCRIPT)
    r = run(latents_args(folder, vae, tmp_path / 'two'), cmd=[sys.executable, '-m', 'torch.distributed.run',
            '--standalone', '--nproc_per_node', '2', str(script)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'rank 0 loader ok' in r.stdout and 'rank 1 loader ok' in r.stdout
    r1 = run(latents_args(folder, vae, tmp_path / 'one'), cmd=console_script())  # 1 rank, the installed command
    assert r1.returncode == 0, r1.stderr
    assert json.loads((tmp_path / 'two' / 'meta.json').read_text()) == json.loads((tmp_path / 'one' / 'meta.json').read_text())
    same_shards(tmp_path / 'two', tmp_path / 'one', 4)
    assert len(LatentDataset(tmp_path / 'two')) == 16
