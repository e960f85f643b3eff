"""The fault suite: what a careless or unlucky user does to a run, and what must survive it.

Every test checks the exit code, that the message is one line with no traceback, and that nothing on disk was lost
(the previous checkpoints are byte-identical, the run's own files unmixed). Most run the console scripts in-process
(`cli_train([...])`, the function `mf-train` calls); subprocesses only where a real second process matters (a lock
holder, a kill mid-write, torchrun, the warnings of a fresh interpreter)."""
import hashlib, io, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch

from meanflow_nb.train import (get_config, load_checkpoint, latest_checkpoint, list_checkpoints, save_checkpoint,
                               state_digest, RunError, build_data, RESUME_MAY_CHANGE)
from meanflow_nb.cli import cli_train, cli_sample, cli_fid, cli_latents, cli_bench
from meanflow_nb.data import build_dataset, make_shapes_folder, LatentDataset, LATENT_FORMAT
from meanflow_nb.checkpoint import read_log, load_run

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
TOY = ['--preset', 'toy2d', '--baseline_fm', 'false', '--eval_samples', '200', '--no-progress', '--global_batch', '64',
       '--model_kwargs', '{"hidden": 32, "depth": 2}', '--log_every', '5', '--ckpt_every', '10', '--keep_ckpts', '3']


def cli(fn, args, capsys):
    "Run a console script in-process: `(exit code, stdout, stderr)`."
    capsys.readouterr()
    try: fn([str(a) for a in args]); code = 0
    except SystemExit as ex: code = ex.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, needle: str = '') -> str:
    "The stderr of a failed command: exactly one line, `error: ...`, no traceback, containing `needle`."
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


def last_line(err: str, needle: str = '') -> str:
    "The stderr of a run that failed after it started: progress notes (`resumed from`, `warning:`), then one error line."
    assert 'Traceback' not in err, err
    *notes, last = err.strip().splitlines()
    assert last.startswith('error: ') and needle in last, (needle, err)
    assert all(l.startswith(('resumed from step ', 'warning: ')) for l in notes), err
    return last


def snap(folder) -> dict:
    "Relative path -> sha256 of every file under `folder` (the lock file aside: its holder writes its pid there)."
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file() and p.name != '.lock'}


def ckpt_steps(out): return [int(p.stem.split('_')[1]) for p in list_checkpoints(out)]


def log_steps(out): return [json.loads(l)['step'] for l in (Path(out) / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "One finished 20-step toy run (checkpoints at 10 and 20), trained once; tests work on copies."
    out = tmp_path_factory.mktemp('base') / 'run'
    try: cli_train(TOY + ['--steps', '20', '--out', str(out)])
    except SystemExit as ex: assert ex.code == 0
    assert ckpt_steps(out) == [10, 20]
    return out


@pytest.fixture
def run(base, tmp_path):
    "A private copy of the base run."
    dst = tmp_path / 'run'; shutil.copytree(base, dst); return dst


# ---------------------------------------------------------------- a run folder belongs to one run

HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d' % os.getpid()); print('locked', flush=True); time.sleep(120)\n")


def hold_lock(folder):
    "Another process that holds the folder's lock (as a running `mf-train` does) until it is killed."
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(Path(folder) / '.lock')], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == 'locked'
    return p


def test_second_run_is_refused_then_the_lock_dies_with_its_holder(run, capsys):
    "A folder in use: exit 2 naming it, nothing touched. After `kill -9` of the holder the OS has dropped the lock."
    before = snap(run); holder = hold_lock(run)
    try:
        code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
        assert code == 2
        assert str(run) in one_line(err, 'is in use by another run (pid ')
        assert snap(run) == before
    finally: holder.send_signal(signal.SIGKILL); holder.wait()
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)  # no stale lock
    assert code == 0, err
    assert ckpt_steps(run) == [10, 20, 30]


def test_torchrun_ranks_all_refuse_a_folder_in_use(run):
    "Under torchrun only rank 0 takes the lock; its refusal reaches rank 1 too, so the job exits instead of hanging."
    before = snap(run); holder = hold_lock(run)
    try:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'meanflow_nb.train',
               *TOY, '--steps', '30', '--resume', '--out', str(run)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180)
    finally: holder.send_signal(signal.SIGKILL); holder.wait()
    assert r.returncode != 0
    assert r.stderr.count('is in use by another run') == 2, r.stderr[-2000:]  # one line from each rank
    assert 'meanflow_nb/' not in r.stderr  # no frame of ours: torchrun's own report of the failed ranks aside
    assert snap(run) == before


def test_rerun_without_resume_is_refused(run, capsys):
    before = snap(run)
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--out', run], capsys)
    assert code == 2
    one_line(err, 'already holds a run (newest: ckpt_00000020.pt); pass --resume')
    assert snap(run) == before


def test_overwrite_starts_clean(run, capsys):
    (run / 'notes.txt').write_text('mine')  # not the run's: --overwrite must leave it
    code, _, err = cli(cli_train, TOY + ['--steps', '10', '--seed', '1', '--overwrite', '--out', run], capsys)
    assert code == 0, err
    assert ckpt_steps(run) == [10] and log_steps(run) == [5, 10]
    assert load_checkpoint(run / 'ckpt_00000010.pt')['config']['seed'] == 1
    assert json.loads((run / 'config.json').read_text())['seed'] == 1
    assert (run / 'notes.txt').read_text() == 'mine'
    code, _, err = cli(cli_train, TOY + ['--steps', '10', '--overwrite', '--resume', '--out', run], capsys)
    assert code == 2
    one_line(err, 'pass one of them')


@pytest.mark.parametrize('flags,fields', [
    (['--seed', '1'], 'seed: 0 -> 1'),
    (['--lr', '2e-3', '--global_batch', '32'], 'global_batch: 64 -> 32, lr: 0.001 -> 0.002'),
    (['--model_kwargs', '{"hidden": 48, "depth": 2}'], "model_kwargs: {'hidden': 32, 'depth': 2} -> {'hidden': 48, 'depth': 2}"),
    (['--method', 'fm'], "method: 'mf' -> 'fm'"),
])
def test_resume_refuses_other_settings(run, capsys, flags, fields):
    "A resume that would train another run (here: a different seed, lr, batch, model or method) is refused, field by field."
    before = snap(run)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run] + flags, capsys)
    assert code == 2
    one_line(err, f'it was trained with other settings ({fields})')
    assert snap(run) == before


def test_resume_refuses_fewer_steps(run, capsys):
    before = snap(run)
    code, _, err = cli(cli_train, TOY + ['--steps', '15', '--resume', '--out', run], capsys)
    assert code == 2
    one_line(err, 'it is at step 20, but this config trains 15 steps; pass --steps 20 or more')
    assert snap(run) == before


def test_resume_is_exact_including_the_optimizer(base, run, capsys):
    "Killed right after step 10's checkpoint (step 20's lost), resumed with other logging: the same weights, EMA and AdamW state."
    (run / 'ckpt_00000020.pt').unlink(); (run / 'metrics.json').unlink()
    assert log_steps(run) == [5, 10, 15, 20]  # lines logged after the checkpoint, as a killed run leaves them
    with open(run / 'log.jsonl', 'a') as f: f.write('{"step": 25, "lo')  # and a line torn by the kill
    assert {'steps', 'log_every', 'ckpt_every', 'eval_samples'} <= set(RESUME_MAY_CHANGE)
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--log_every', '10', '--resume', '--out', run], capsys)
    assert code == 0, err
    assert 'resumed from step 10' in err
    assert log_steps(run) == [5, 10, 20]  # cut back to step 10, then the resumed run's own lines: each step once
    a, b = load_checkpoint(base / 'ckpt_00000020.pt'), load_checkpoint(run / 'ckpt_00000020.pt')
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=0, rtol=0)
    for k in a['ema'][0]: torch.testing.assert_close(a['ema'][0][k], b['ema'][0][k], atol=0, rtol=0)
    assert a['opt']['param_groups'] == b['opt']['param_groups']
    assert a['opt']['state'].keys() == b['opt']['state'].keys() and len(a['opt']['state']) > 0
    for i in a['opt']['state']:
        for k in ('step', 'exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(a['opt']['state'][i][k], b['opt']['state'][i][k], atol=0, rtol=0)
    assert a['sha256'] == state_digest(a) and b['sha256'] == state_digest(b)
    a['config'], b['config'] = {}, {}; a['sha256'] = b['sha256'] = ''
    assert state_digest(a) == state_digest(b)  # and nothing else in the checkpoint differs either


# ---------------------------------------------------------------- checkpoints are verified

def overwrite_bytes(path: Path, offset: int, data: bytes):
    with open(path, 'r+b') as f: f.seek(offset); f.write(data)


def test_garbage_in_a_tensor_is_caught_by_the_hash(run, capsys):
    "4 KiB of garbage over a tensor's bytes leave a valid archive (it loads), so only the sha256 can tell: fall back to step 10."
    p = run / 'ckpt_00000020.pt'; st = load_checkpoint(p); raw = p.read_bytes()
    w = max(st['model'].values(), key=lambda t: t.numel())                      # the largest weight, >= 4 KiB
    at = raw.find(w.numpy().tobytes()); assert at > 0 and w.numel() * 4 >= 4096
    overwrite_bytes(p, at, np.random.default_rng(0).bytes(4096))
    assert torch.load(p, weights_only=True)['step'] == 20                        # torch itself does not notice
    with pytest.raises(RunError, match='does not match the sha256'): load_checkpoint(p)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 0, err
    assert 'ckpt_00000020.pt is corrupt: its content does not match the sha256' in err and 'resumed from step 10' in err
    st = load_checkpoint(run / 'ckpt_00000030.pt')
    assert all(torch.isfinite(v).all() for v in st['model'].values())
    assert all(np.isfinite(v) for v in json.loads((run / 'metrics.json').read_text()).values() if isinstance(v, float))


def test_garbage_mid_file_falls_back(run):
    "4 KiB of garbage in the middle of the file, wherever it lands: refused, the older checkpoint is used."
    p = run / 'ckpt_00000020.pt'; n = p.stat().st_size
    overwrite_bytes(p, n // 2 - 2048, np.random.default_rng(1).bytes(4096))
    with pytest.raises(RunError, match='corrupt'): load_checkpoint(p)
    assert latest_checkpoint(run)['step'] == 10


def test_all_checkpoints_corrupt_fails_clearly(run, capsys):
    for p in list_checkpoints(run): overwrite_bytes(p, p.stat().st_size // 2 - 2048, b'\0' * 4096)
    before = snap(run)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 1
    last_line(err, 'error: no usable checkpoint in')
    assert len(err.strip().splitlines()) == 3  # one warning per checkpoint tried, then the error
    assert snap(run) == before  # nothing deleted: the user may still rescue them


def test_malicious_pickle_runs_nothing(run, capsys):
    "A checkpoint whose unpickling would run a command: refused by `weights_only=True`, the command never runs."
    marker = run.parent / 'pwned'
    class Evil:
        def __reduce__(self): return (os.system, (f'touch {marker}',))
    torch.save({'step': 30, 'model': Evil(), 'config': {}}, run / 'ckpt_00000030.pt')
    with pytest.raises(RunError, match='corrupt or truncated'): load_checkpoint(run / 'ckpt_00000030.pt')
    assert latest_checkpoint(run)['step'] == 20
    assert not marker.exists()


def test_non_finite_weights_are_never_saved(run, capsys, monkeypatch):
    "Weights that turn inf while the loss is still finite: the save is refused (exit 1), the older checkpoints stay."
    import meanflow_nb.train as T
    orig = T.train_step
    def poisoned(model, *a, **kw):
        stats = orig(model, *a, **kw)
        if a[5] == 24: next(model.parameters()).data[0] = float('inf')  # after step 25's update
        return stats
    monkeypatch.setattr(T, 'train_step', poisoned)
    before = snap(run)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--ckpt_every', '5', '--resume', '--out', run], capsys)
    assert code == 1
    last_line(err, 'non-finite weights at step 25')
    assert ckpt_steps(run) == [10, 20] and not list(run.glob('*.tmp'))
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt')} == {k: v for k, v in before.items() if k.startswith('ckpt')}


def test_non_finite_checkpoint_is_refused_on_load(run):
    "A checkpoint with NaN weights but a matching hash (written by some other tool): refused on load, fall back."
    st = load_checkpoint(run / 'ckpt_00000020.pt')
    k = next(iter(st['model'])); st['model'][k][0] = float('nan'); st['step'] = 30
    torch.save({**st, 'sha256': state_digest(st)}, run / 'ckpt_00000030.pt')
    with pytest.raises(RunError, match='holds non-finite weights'): load_checkpoint(run / 'ckpt_00000030.pt')
    assert latest_checkpoint(run)['step'] == 20


def test_kill_during_a_checkpoint_write(base, tmp_path, capsys):
    "SIGKILL halfway through writing step 20's checkpoint: a stray .tmp, never a torn ckpt; the resume is bit-exact."
    out = tmp_path / 'killed'
    script = ("import os, signal, sys, torch\n"
              "from meanflow_nb.cli import cli_train\n"
              "orig, n = torch.save, [0]\n"
              "def save(obj, f, *a, **kw):\n"
              "    n[0] += 1\n"
              "    if n[0] == 2:\n"
              "        import io; b = io.BytesIO(); orig(obj, b, *a, **kw); f.write(b.getvalue()[:len(b.getvalue()) // 2]); f.flush()\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return orig(obj, f, *a, **kw)\n"
              "torch.save = save\n"
              "cli_train(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, '-c', script, *TOY, '--steps', '20', '--out', str(out)], capture_output=True, text=True,
                       env=ENV, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert ckpt_steps(out) == [10] and (out / 'ckpt_00000020.pt.tmp').exists()
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--resume', '--out', out], capsys)
    assert code == 0, err
    a, b = load_checkpoint(base / 'ckpt_00000020.pt'), load_checkpoint(out / 'ckpt_00000020.pt')
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=0, rtol=0)
    for k in a['ema'][0]: torch.testing.assert_close(a['ema'][0][k], b['ema'][0][k], atol=0, rtol=0)


# ---------------------------------------------------------------- every user error is one line, exit 2

@pytest.mark.parametrize('flags,needle', [
    (['--lr', 'inf'], 'lr must be finite, got inf'),
    (['--lr', 'nan'], 'lr must be finite, got nan'),
    (['--lr', '0'], 'lr must be positive'),
    (['--lr=-1e-3'], 'lr must be positive'),
    (['--lr', 'abc'], "argument --lr: invalid float value: 'abc'"),
    (['--global_batch', '0'], 'global_batch must be positive'),
    (['--ema_warmup', 'maybe'], "argument --ema_warmup: expected true or false (or 1/0, yes/no), got 'maybe'"),
    (['--betas', '0.9,x'], 'expected comma-separated numbers'),
    (['--model_kwargs', '{"hidden": 32,'], 'expected a JSON object'),
    (['--model_kwargs', '{"hidden": 32, "widht": 3}'], 'model_kwargs of ToyMLP: unknown key(s) widht; valid: hidden, depth, emb_dim'),
    (['--model_kwargs', '{"dim": 3}'], 'unknown key(s) dim'),
    (['--model', 'DiT-T/2', '--data', 'digits', '--model_kwargs', '{"input_size": 16}'], 'input_size come(s) from the data'),
    (['--model', 'DiT-T/2', '--data', 'digits', '--model_kwargs', '{"depht": 1}'], 'DiT-T/2 has no option(s) depht'),
    (['--data', 'digits', '--model', 'DiT-T/2', '--data_kwargs', '{"resolution": 8}'], "data_kwargs of 'digits': unknown key(s) resolution"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, needle):
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--out', tmp_path / 'o'] + flags, capsys)
    assert code == 2
    one_line(err, needle)
    assert not list((tmp_path / 'o').glob('ckpt_*'))


def test_existing_file_as_out(tmp_path, capsys):
    f = tmp_path / 'a_file'; f.write_text('keep me')
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--out', f], capsys)
    assert code == 2
    one_line(err, 'cannot write to the run folder')
    assert f.read_text() == 'keep me'


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp('img') / 'shapes', n_per_class=3, size=(10, 14))


def test_preset_data_kwargs_stay_with_the_preset(shapes, capsys, tmp_path):
    "`--preset digits --data imagefolder`: the preset's `{'size': 8}` is for digits, ImageFolder does not get it."
    cfg = get_config('digits', data='imagefolder', data_path=str(shapes))
    assert cfg.data_kwargs == {} and get_config('digits').data_kwargs == {'size': 8}
    assert get_config('toy2d', model='ToyIMF').model_kwargs == {}
    ds = build_dataset('imagefolder', shapes, **get_config('digits', data='imagefolder', data_path=str(shapes),
                                                          data_kwargs={'resolution': 8}).data_kwargs)
    assert ds[0][0].shape == (3, 8, 8) and len(ds) == 6
    code, _, err = cli(cli_train, ['--preset', 'digits', '--data', 'imagefolder', '--data_path', shapes, '--data_kwargs',
                                   '{"size": 8}', '--out', tmp_path / 'o'], capsys)
    assert code == 2
    one_line(err, "data_kwargs of 'imagefolder': unknown key(s) size; valid: resolution")


def test_truncated_png_is_skipped_by_default_and_refused_when_strict(shapes, tmp_path, capsys):
    folder = tmp_path / 'imgs'; shutil.copytree(shapes, folder)
    p = folder / 'disc' / 'disc_001.png'; p.write_bytes(p.read_bytes()[:-30])  # header intact, end cut off
    with pytest.warns(UserWarning, match=r'skipped 1 files \(1 truncated\): disc/disc_001.png'):
        ds = build_dataset('imagefolder', folder, resolution=8)
    assert len(ds) == 5 and all(ds[i][0].shape == (3, 8, 8) for i in range(5))  # every kept image decodes
    code, _, err = cli(cli_train, ['--preset', 'digits', '--model', 'DiT-T/2', '--data', 'imagefolder', '--data_path', folder,
                                   '--data_kwargs', '{"resolution": 8, "strict": true}', '--num_classes', '2',
                                   '--out', tmp_path / 'o'], capsys)
    assert code == 2
    one_line(err, 'strict scan failed: ')
    assert 'disc/disc_001.png' in err


def fake_latents(root: Path, n=8) -> Path:
    "A latent folder as `mf-latents` writes it (one shard), made by hand."
    from safetensors.torch import save_file
    root.mkdir(parents=True)
    meta = dict(format=LATENT_FORMAT, vae='tiny', resolution=16, latent_shape=[4, 8, 8], n=n, shard_size=n, n_shards=1,
                normalization='none', scaling_factor=None, classes=['a', 'b'])
    (root / 'meta.json').write_text(json.dumps(meta))
    t = dict(mean=torch.randn(n, 4, 8, 8), std=torch.rand(n, 4, 8, 8), y=torch.arange(n) % 2, index=torch.arange(n))
    save_file(t, str(root / 'shard_00000.safetensors'),
              metadata=dict(format=LATENT_FORMAT, vae='tiny', resolution='16', normalization='none', shard='0', start='0', count=str(n)))
    return root


@pytest.mark.parametrize('damage,needle', [
    (lambda r: (r / 'shard_00000.safetensors').write_bytes(os.urandom(4096)), 'shard_00000.safetensors is unreadable'),
    (lambda r: (r / 'shard_00000.safetensors').write_bytes((r / 'shard_00000.safetensors').read_bytes()[:-1000]), 'is unreadable'),
    (lambda r: (r / 'meta.json').write_text('{"format": "meanflow'), 'meta.json is not valid JSON'),
    (lambda r: (r / 'meta.json').write_text(json.dumps({k: v for k, v in json.loads((r / 'meta.json').read_text()).items()
                                                        if k != 'shard_size'})), 'meta.json lacks shard_size'),
])
def test_damaged_latents_are_one_line(tmp_path, capsys, damage, needle):
    lat = fake_latents(tmp_path / 'lat')
    assert len(LatentDataset(lat)) == 8  # intact, it loads
    damage(lat)
    code, _, err = cli(cli_train, ['--preset', 'digits', '--model', 'DiT-T/2', '--data', 'latents', '--data_path', lat,
                                   '--num_classes', '2', '--global_batch', '4', '--out', tmp_path / 'o'], capsys)
    assert code == 2
    one_line(err, needle)


def test_sample_with_a_checkpoint_that_is_not_one(run, tmp_path, capsys):
    "mf-sample on a file that lacks `model` or `config`, or on a folder holding only such files."
    bad = tmp_path / 'bad.pt'; torch.save({'step': 1, 'config': {}}, bad)
    code, _, err = cli(cli_sample, [run, '--ckpt', bad, '--out', tmp_path / 's'], capsys)
    assert code == 2
    one_line(err, 'is not a training checkpoint: it lacks model')
    torch.save({'step': 1, 'model': {}}, bad)
    code, _, err = cli(cli_sample, [run, '--ckpt', bad, '--out', tmp_path / 's'], capsys)
    assert code == 2
    one_line(err, 'it lacks config')
    folder = tmp_path / 'notrun'; folder.mkdir(); shutil.copy(bad, folder / 'ckpt_00000001.pt')
    code, _, err = cli(cli_sample, [folder, '--out', tmp_path / 's'], capsys)
    assert code == 2
    last_line(err, 'error: no usable checkpoint in')


@pytest.mark.parametrize('shape', ['1,x,8', '', '1,0,8', '1;8;8'])
def test_sample_malformed_shape(run, tmp_path, capsys, shape):
    code, _, err = cli(cli_sample, [run, '--shape', shape, '--out', tmp_path / 's'], capsys)
    assert code == 2
    one_line(err, 'argument --shape: expected positive integers')


def test_fid_on_images_of_different_sizes_or_truncated(tmp_path, capsys):
    from PIL import Image
    d = tmp_path / 'pngs'; d.mkdir()
    for i in range(4): Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(d / f'{i}.png')
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(d / '9.png')
    code, _, err = cli(cli_fid, [d], capsys)
    assert code == 2
    one_line(err, 'differ in size: 8x8 (0.png) and 8x9 (9.png)')
    (d / '9.png').unlink(); p = d / '3.png'; p.write_bytes(p.read_bytes()[:-20])
    code, _, err = cli(cli_fid, [d], capsys)
    assert code == 2
    one_line(err, '3.png is truncated')


@pytest.mark.parametrize('fn,args,needle', [
    (cli_bench, ['nope'], 'unknown part(s) nope'),
    (cli_bench, ['--threads', 'x'], "argument --threads: invalid int value: 'x'"),
    (cli_bench, ['steps', '--json', '/no/such/dir/b.json'], 'its folder does not exist'),
    (cli_latents, ['--data', '/no/such/images', '--out', '/tmp/x'], 'does not exist'),
    (cli_latents, ['--data', '.', '--out', '/tmp/x', '--resolution', '2.5'], "invalid int value: '2.5'"),
    (cli_fid, ['/no/such.npz'], 'samples not found'),
    (cli_sample, ['/no/such/run'], 'does not exist'),
])
def test_other_console_scripts_are_one_line(capsys, fn, args, needle):
    code, _, err = cli(fn, args, capsys)
    assert code == 2
    one_line(err, needle)


def test_error_after_step_1_is_one_line(tmp_path):
    "A fresh `mf-train` that diverges after its first JVP: exactly one stderr line (no torch.jit FutureWarning), exit 1."
    r = subprocess.run(['mf-train', *TOY, '--steps', '50', '--lr', '1e30', '--ckpt_every', '1', '--out', str(tmp_path / 'nan')],
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 1, r.stderr[-2000:]
    one_line(r.stderr, 'non-finite loss')
    for ck in list_checkpoints(tmp_path / 'nan'): load_checkpoint(ck)  # every checkpoint written is verified and finite


# ---------------------------------------------------------------- every number is checked before any work starts

@pytest.mark.parametrize('flags,needle', [
    (['--betas', '0.9'], 'betas must be two numbers in [0, 1) such as 0.9,0.95, got 0.9'),
    (['--betas', '0.9,1.0'], 'betas must be two numbers in [0, 1)'),
    (['--betas', '0.9,nan'], 'betas must be finite numbers, got 0.9,nan'),
    (['--betas', ''], 'betas must be two numbers in [0, 1) such as 0.9,0.95, got (none)'),
    (['--weight_decay=-0.1'], 'weight_decay must be >= 0, got -0.1'),
    (['--weight_decay', 'inf'], 'weight_decay must be finite'),
    (['--seed=-1'], 'seed must be in [0, 2**63 - 1], got -1'),
    (['--seed', str(2 ** 63)], 'seed must be in [0, 2**63 - 1]'),
    (['--eval_samples=-5'], 'eval_samples must be >= 2'),
    (['--eval_samples', '0'], 'eval_samples must be >= 2'),
    (['--grad_clip=-1'], 'grad_clip must be >= 0, got -1'),
    (['--ema_decays', '1.0'], 'ema_decays must lie in [0, 1)'),
    (['--ema_decays', 'inf'], 'ema_decays must be finite numbers'),
    (['--norm_eps', '0'], 'norm_eps must be > 0'),
    (['--P_std', '0'], 'P_std must be > 0'),
    (['--cfg_kappa', '1'], 'cfg_kappa must be in [0, 1)'),
    (['--cfg_t_start', '0.8', '--cfg_t_end', '0.2'], 'need cfg_t_start <= cfg_t_end'),
    (['--dist_timeout', '0'], 'dist_timeout must be > 0'),
    (['--num_classes=-1'], 'num_classes must be >= 0'),
    (['--imf_omega_max', '0.5'], 'imf_omega_max must be >= 1'),
    (['--time_dist', 'normal'], "time_dist must be 'logit_normal' or 'uniform', got 'normal'"),
    (['--model', 'DiT-Q/3'], "unknown model 'DiT-Q/3'; valid: ToyMLP, ToyIMF, DiT-B/4"),
    (['--data', 'cifar100'], "unknown data 'cifar100'; valid: checkerboard"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flags, needle):
    "Every numeric field finite and in range, every name known: exit 2, one line naming the flag, no run folder made."
    out = tmp_path / 'o'
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--out', out] + flags, capsys)
    assert code == 2, err
    one_line(err, needle)
    assert not out.exists()


def test_init_from_another_model_is_one_line(run, tmp_path, capsys):
    "Fine-tuning from a checkpoint of another model (or the same model at another width): exit 2 naming both, nothing written."
    before, out = snap(run), tmp_path / 'ft'
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--model', 'ToyIMF', '--model_kwargs', '{}', '--init_from', run, '--out', out], capsys)
    assert code == 2
    one_line(err, f"init_from '{run}' holds a ToyMLP model, but this run trains ToyIMF; pass --model ToyMLP")
    assert not out.exists()
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--model_kwargs', '{"hidden": 16, "depth": 2}', '--init_from',
                                         run / 'ckpt_00000010.pt', '--out', out], capsys)
    assert code == 2
    one_line(err, 'its weights do not fit this model (net.0.weight is (32, ')
    assert snap(out) == {} and snap(run) == before        # the folder was claimed, nothing written into it
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--init_from', run, '--out', tmp_path / 'ok'], capsys)
    assert code == 0, err                                  # the same model and widths: fine-tunes


@pytest.mark.parametrize('env,needle', [
    (dict(WORLD_SIZE='2', RANK='5', LOCAL_RANK='0', MASTER_ADDR='localhost', MASTER_PORT='29500'), 'RANK must be an integer in [0, 1], got '),
    (dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0', MASTER_ADDR='localhost', MASTER_PORT='x'), "MASTER_PORT must be an integer in [1, 65535], got 'x'"),
    (dict(WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='localhost', MASTER_PORT='29500'), 'RANK is not set, but WORLD_SIZE=2'),
    (dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='0', MASTER_PORT='29500'), 'MASTER_ADDR is not set'),
    (dict(WORLD_SIZE='two'), "WORLD_SIZE must be an integer in [1, "),
    (dict(RANK='0'), 'RANK is set but WORLD_SIZE is not'),
    (dict(WORLD_SIZE='1', LOCAL_RANK='1.5'), "LOCAL_RANK must be an integer in [0, 0], got '1.5'"),
])
def test_bad_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch, env, needle):
    "torchrun's variables missing, not integers or out of range: exit 2, one line naming the variable, before any work."
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID'): monkeypatch.delenv(k, raising=False)
    for k, v in env.items(): monkeypatch.setenv(k, v)
    out = tmp_path / 'o'
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--out', out], capsys)
    assert code == 2, err
    assert 'launch with torchrun' in one_line(err, needle)
    assert not out.exists()


# ---------------------------------------------------------------- only the trainer's own files are a run's

def test_checkpoints_are_the_trainers_names_by_step(run, tmp_path, capsys):
    "`ckpt_best.pt`, `ckpt_1.pt`, a `.bak` and notes beside the checkpoints: never resumed from, never pruned, never deleted."
    shutil.copy(run / 'ckpt_00000010.pt', run / 'ckpt_best.pt')          # sorts after ckpt_00000020.pt by name
    shutil.copy(run / 'ckpt_00000010.pt', run / 'ckpt_1.pt')
    shutil.copy(run / 'ckpt_00000020.pt', run / 'ckpt_00000020.pt.bak')
    (run / 'notes.txt').write_text('mine')
    others = {k: v for k, v in snap(run).items() if k in ('ckpt_best.pt', 'ckpt_1.pt', 'ckpt_00000020.pt.bak', 'notes.txt')}
    assert [p.name for p in list_checkpoints(run)] == ['ckpt_00000010.pt', 'ckpt_00000020.pt']
    code, _, err = cli(cli_train, TOY + ['--steps', '50', '--resume', '--out', run], capsys)
    assert code == 0, err
    assert 'resumed from step 20' in err
    assert ckpt_steps(run) == [30, 40, 50]                                # keep_ckpts 3 pruned only its own
    assert {k: v for k, v in snap(run).items() if k in others} == others
    code, _, err = cli(cli_train, TOY + ['--steps', '10', '--overwrite', '--out', run], capsys)
    assert code == 0, err
    assert ckpt_steps(run) == [10] and {k: v for k, v in snap(run).items() if k in others} == others
    d = tmp_path / 'steps'; d.mkdir()
    for n in ('ckpt_100000000.pt', 'ckpt_99999999.pt', 'ckpt_00000005.pt', 'ckpt_5.pt', 'ckpt_0000000x.pt'): (d / n).write_bytes(b'')
    assert [p.name for p in list_checkpoints(d)] == ['ckpt_00000005.pt', 'ckpt_99999999.pt', 'ckpt_100000000.pt']


def test_run_files_without_checkpoints_are_not_overwritten(tmp_path, capsys):
    """A folder with config.json, log.jsonl or metrics.json but no checkpoint (a run killed before its first one, or another
    tool's): refused without --resume or --overwrite, exit 2, byte-identical."""
    out = tmp_path / 'o'; out.mkdir()
    for name in ('config.json', 'log.jsonl', 'metrics.json'):
        (out / name).write_text('{"theirs": 1}\n'); before = snap(out)
        code, _, err = cli(cli_train, TOY + ['--steps', '2', '--out', out], capsys)
        assert code == 2
        one_line(err, f'holds the files of a run ({name}')
        assert snap(out) == before
        (out / name).unlink()
    (out / 'metrics.json').write_text('{"theirs": 1}\n')
    code, _, err = cli(cli_train, TOY + ['--steps', '2', '--overwrite', '--out', out], capsys)
    assert code == 0, err
    assert json.loads((out / 'metrics.json').read_text())['steps'] == 2


# ---------------------------------------------------------------- SIGTERM / SIGUSR1 exit 75 in every phase

def preempted_line(err: str, needle: str) -> str:
    "The stderr of a preempted run: exactly one line (no traceback), naming what is on disk and `--resume`."
    assert 'Traceback' not in err, err
    lines = [l for l in err.strip().splitlines() if not l.startswith('resumed from step ')]
    assert len(lines) == 1 and needle in lines[0] and '--resume' in lines[0], err
    return lines[0]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_signal_during_startup_exits_75_with_nothing_written(tmp_path, capsys, monkeypatch, sig):
    "A signal while the data and model are built: exit 75 before step 1, no checkpoint, no config.json; the same command then runs."
    import meanflow_nb.train as T
    real = T.build_data
    def build_data(cfg): os.kill(os.getpid(), sig); return real(cfg)
    monkeypatch.setattr(T, 'build_data', build_data)
    handler = signal.getsignal(sig)
    out = tmp_path / 'o'
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--out', out], capsys)
    assert code == 75, err
    preempted_line(err, 'preempted during startup, before step 1: nothing new to save')
    assert snap(out) == {}                                        # not even config.json
    assert signal.getsignal(sig) == handler                       # the handlers are the caller's again
    monkeypatch.setattr(T, 'build_data', real)
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--out', out], capsys)
    assert code == 0, err
    assert ckpt_steps(out) == [10, 20]


def test_signal_during_the_final_evaluation_exits_75_and_resume_evaluates(run, capsys, monkeypatch):
    "A SIGTERM while the metrics are computed: exit 75, the last checkpoint kept, no metrics.json; --resume only evaluates."
    import meanflow_nb.eval as E
    real = E.evaluate_toy
    def evaluate_toy(*a, **k): os.kill(os.getpid(), signal.SIGTERM); return real(*a, **k)
    monkeypatch.setattr(E, 'evaluate_toy', evaluate_toy)
    (run / 'metrics.json').unlink()
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 75, err
    preempted_line(err, 'preempted during the final evaluation: the checkpoint of step 30 is in')
    assert ckpt_steps(run) == [10, 20, 30] and not (run / 'metrics.json').exists()
    before = snap(run)
    monkeypatch.setattr(E, 'evaluate_toy', real)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 0, err
    assert json.loads((run / 'metrics.json').read_text())['steps'] == 30
    cks = lambda s: {k: v for k, v in s.items() if k.startswith('ckpt_')}
    assert cks(snap(run)) == cks(before) and 'resumed from step 30' in err  # no step retrained
    assert log_steps(run) == list(range(5, 31, 5))


def test_signal_during_training_exits_75_in_process(tmp_path, capsys, monkeypatch):
    "The loop's own case, in-process: SIGUSR1 at step 13 -> the step ends, ckpt_00000013.pt is written, exit 75."
    import meanflow_nb.train as T
    real = T.train_step
    def train_step(*a, **k):
        if a[6] == 12: os.kill(os.getpid(), signal.SIGUSR1)      # step index 12: the 13th step
        return real(*a, **k)
    monkeypatch.setattr(T, 'train_step', train_step)
    out = tmp_path / 'o'
    code, _, err = cli(cli_train, TOY + ['--steps', '20', '--out', out], capsys)
    assert code == 75, err
    preempted_line(err, 'preempted: stopped after step 13 with a checkpoint in')
    assert ckpt_steps(out) == [10, 13] and not (out / 'metrics.json').exists()


# ---------------------------------------------------------------- caches are keyed on the checkpoint's content

def replace_checkpoint(path, delta=0.05):
    "The run retrained: a valid checkpoint at the same step with other weights (its own sha256)."
    st = load_checkpoint(path)
    st['model'] = {k: v + delta if v.is_floating_point() else v for k, v in st['model'].items()}
    st['ema'] = [{k: v + delta if v.is_floating_point() else v for k, v in e.items()} for e in st['ema']]
    save_checkpoint(path, st)


def test_sample_folder_of_a_replaced_checkpoint_is_refused(run, tmp_path, capsys):
    "mf-sample into a folder made from a checkpoint that was since replaced at the same step: exit 2, samples untouched."
    out = tmp_path / 's'
    args = [run, '--out', out, '-n', '16', '--shard-size', '8', '--no-progress']
    code, _, err = cli(cli_sample, args, capsys)
    assert code == 0, err
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['ckpt_sha256'] == load_checkpoint(run / 'ckpt_00000020.pt')['sha256'] and meta['step'] == 20
    code, _, err = cli(cli_sample, args, capsys)
    assert code == 0 and json.loads(_)['skipped']                       # the same checkpoint: the samples are reused
    before = snap(out)
    replace_checkpoint(run / 'ckpt_00000020.pt')
    code, _, err = cli(cli_sample, args, capsys)
    assert code == 2
    one_line(err, f'{out} holds samples of another checkpoint (sha256 {meta["ckpt_sha256"][:12]}, now ')
    assert snap(out) == before


def test_fid_curve_cache_follows_the_checkpoints(run, monkeypatch):
    "fid_curve's cache: reused for the same checkpoints, measured again for a replaced or a new one, and only for those."
    import meanflow_nb.eval as E
    calls = []
    def fake_fid(x, ref): calls.append(1); return float(np.asarray(x, dtype=float).mean())
    monkeypatch.setattr(E, 'digits_fid', fake_fid)
    first = E.fid_curve(run, nfes=(1,), n=8, batch_size=8)
    assert [r['step'] for r in first] == [10, 20] and len(calls) == 2
    assert E.fid_curve(run, nfes=(1,), n=8, batch_size=8) == first and len(calls) == 2      # cached
    replace_checkpoint(run / 'ckpt_00000020.pt')
    again = E.fid_curve(run, nfes=(1,), n=8, batch_size=8)
    assert len(calls) == 3 and again[0] == first[0] and again[1]['fid1'] != first[1]['fid1']
    rows = json.loads((run / 'fid_curve.json').read_text())['rows']
    assert all(len(r['sha256']) == 64 for r in rows)


SIGNAL_TORCHRUN = ("import os, sys, time, signal\n"
                   "import meanflow_nb.train as T, meanflow_nb.eval as E\n"
                   "from meanflow_nb.cli import cli_train\n"
                   "from meanflow_nb.checkpoint import StopSignals\n"
                   "phase, argv = sys.argv[1], sys.argv[2:]\n"
                   "name, mod = ('build_data', T) if phase == 'startup' else ('evaluate_toy', E)\n"
                   "real = getattr(mod, name)\n"
                   "def hooked(*a, **k):\n"
                   "    if int(os.environ['RANK']) == 0:\n"
                   "        os.kill(os.getppid(), signal.SIGTERM)               # to torchrun, which forwards it to every rank\n"
                   "        t = time.time()\n"
                   "        while not StopSignals.requested() and time.time() - t < 60: time.sleep(0.05)\n"
                   "    return real(*a, **k)\n"
                   "setattr(mod, name, hooked)\n"
                   "cli_train(argv)\n")


@pytest.mark.parametrize('phase,needle', [('startup', 'preempted during startup, before step 1'),
                                          ('evaluation', 'preempted during the final evaluation: the checkpoint of step 20')])
def test_sigterm_to_torchrun_reaches_both_gloo_ranks_in_every_phase(tmp_path, phase, needle):
    """SIGTERM to torchrun during startup or the final evaluation: both ranks exit 75 with the same line (rank 1 does not
    hang waiting for rank 0's metrics), nothing is lost; --resume on 2 ranks then finishes."""
    script = tmp_path / 'hook.py'; script.write_text(SIGNAL_TORCHRUN)
    out = tmp_path / 'o'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), phase,
           *TOY, '--steps', '20', '--param_check_every', '0', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0, r.stderr[-2000:]                                # torchrun reports the signal it got
    assert r.stderr.count(needle) == 2, r.stderr[-3000:]                      # one line from each rank
    assert 'meanflow_nb/' not in r.stderr and 'hook.py' not in r.stderr   # no frame of ours: torchrun's own report aside
    assert ckpt_steps(out) == ([] if phase == 'startup' else [10, 20]) and not (out / 'metrics.json').exists()
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m',
                          'meanflow_nb.train', *TOY, '--steps', '20', '--resume', '--out', str(out)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ckpt_steps(out) == [10, 20] and json.loads((out / 'metrics.json').read_text())['steps'] == 20


def test_sample_numbers_are_checked_before_sampling(run, tmp_path, capsys):
    "mf-sample --seed -1 (a numpy traceback before) and iMF guidance out of range: exit 2, one line, nothing written."
    from meanflow_nb.core import ConfigError
    from meanflow_nb.eval import _apply_guidance
    code, _, err = cli(cli_sample, [run, '--out', tmp_path / 's', '-n', '8', '--seed=-1', '--no-progress'], capsys)
    assert code == 2
    one_line(err, 'seed must be an integer in [0, 2**63 - 1], got -1')
    assert not (tmp_path / 's').exists()
    cfg = get_config('toy2d', method='imf', model='ToyIMF', model_kwargs={})
    for g, needle in [({'eval_omega': float('nan')}, '--omega must be a finite number >= 0'),
                      ({'eval_t_min': 0.8, 'eval_t_max': 0.2}, 'need 0 <= --t-min <= --t-max <= 1'),
                      ({'eval_t_max': 1.5}, 'need 0 <= --t-min <= --t-max <= 1')]:
        with pytest.raises(ConfigError, match=needle.replace('+', r'\+')): _apply_guidance(cfg, g)
    assert _apply_guidance(cfg, {'eval_omega': 3.0}).eval_omega == 3.0


# ---------------------------------------------------------------- mf-sample and mf-fid: sizes, shapes, damaged folders, non-images

@pytest.mark.parametrize('flags,needle', [
    (['-n', str(10 ** 15)], 'samples in shards of 1,000 are 1,000,000,000,000 shard files; at most 100,000'),
    (['-n', str(10 ** 15), '--shard-size', str(10 ** 12)], 'on disk (the shards, then samples.npz)'),
    (['-n', str(10 ** 9), '--shard-size', str(10 ** 5)], 'of memory; this machine has'),
])
def test_sample_huge_counts_are_one_line_before_any_work(run, tmp_path, capsys, monkeypatch, flags, needle):
    "A huge -n planned no shard list (MemoryError before); too much for the disk or memory: exit 2, nothing written."
    import meanflow_nb.shards as S
    if 'memory' in needle:                                                    # this machine's disk is small: let memory decide
        monkeypatch.setattr(S.shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(2 ** 60, 0, 2 ** 60))
        monkeypatch.setattr(S.os, 'sysconf', lambda k: {'SC_PAGE_SIZE': 4096, 'SC_PHYS_PAGES': 2 ** 18}[k])   # 1 GiB
    before = snap(run)
    code, _, err = cli(cli_sample, [run, '--out', tmp_path / 's', '--no-progress', *flags], capsys)
    assert code == 2
    one_line(err, needle)
    assert not (tmp_path / 's').exists() and snap(run) == before


def test_sample_shape_the_network_was_not_built_for(tmp_path, capsys):
    "A digits DiT (1, 8, 8) asked for --shape 1,16,16 built a 16x16 DiT and loaded the weights silently: now one line."
    out = tmp_path / 'dig'
    try: cli_train(['--preset', 'digits', '--steps', '2', '--global_batch', '8', '--eval_samples', '8', '--no-progress',
                    '--ckpt_every', '2', '--out', str(out)])
    except SystemExit as ex: assert ex.code == 0
    for shape, needle in [('1,16,16', 'was built for samples of shape (1, 8, 8) (--shape 1,8,8), not (1, 16, 16)'),
                          ('3,8,8', 'was built for samples of shape (1, 8, 8)')]:
        code, _, err = cli(cli_sample, [out, '--shape', shape, '--out', tmp_path / 's', '-n', '4', '--no-progress'], capsys)
        assert code == 2
        one_line(err, needle)
        assert not (tmp_path / 's').exists()
    code, _, err = cli(cli_sample, [out, '--shape', '1,8,8', '--out', tmp_path / 's', '-n', '4', '--no-progress'], capsys)
    assert code == 0, err


def test_sample_folder_with_a_torn_meta_or_a_damaged_shard(run, tmp_path, capsys):
    """A torn meta.json (or COMPLETE): one line naming it and what to do, the folder untouched. A damaged shard: a warning
    naming it, that shard sampled again, and the samples equal to an undamaged run's."""
    import meanflow_nb.eval as E
    ref = tmp_path / 'ref'
    args = ['-n', '24', '--shard-size', '8', '--no-progress']
    assert cli(cli_sample, [run, '--out', ref, *args], capsys)[0] == 0
    want = np.load(ref / 'samples.npz')['arr_0']
    out = tmp_path / 's'
    real_gather = E.gather_shards
    try:                                                                      # stop before the shards are joined
        E.gather_shards = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        assert cli(cli_sample, [run, '--out', out, *args], capsys)[0] == 130
    finally: E.gather_shards = real_gather
    shard = out / 'shards' / 'shard_00001.npz'; assert shard.exists()
    meta = out / 'meta.json'; good = meta.read_bytes()
    meta.write_bytes(good[:len(good) // 2]); before = snap(out)
    code, _, err = cli(cli_sample, [run, '--out', out, *args], capsys)
    assert code == 2
    one_line(err, f'{meta} is damaged (not valid JSON: ')
    assert f'delete {out} to sample again' in err and snap(out) == before
    meta.write_bytes(good)
    shard.write_bytes(shard.read_bytes()[:-40])                               # cut off, as a full disk or a bad copy leaves it
    code, _, err = cli(cli_sample, [run, '--out', out, *args], capsys)
    assert code == 0, err
    assert err.strip().splitlines()[0].startswith(f'warning: {shard} is damaged (') and 'sampling shard 1 again' in err
    assert np.array_equal(np.load(out / 'samples.npz')['arr_0'], want)
    (out / 'COMPLETE').write_text('{"n_wri')
    code, _, err = cli(cli_sample, [run, '--out', out, *args], capsys)
    assert code == 2
    one_line(err, f'{out / "COMPLETE"} is damaged')


@pytest.mark.parametrize('arr,needle', [
    (np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), 'float32 with values in [-'),
    (np.full((8, 8, 8, 1), 300, np.int32), 'int32 with values in [300, 300]'),
    (np.full((8, 8, 8, 1), np.nan, np.float64), '(not all finite)'),
    (np.zeros((8, 8, 8, 1), bool), 'have dtype bool'),
    (np.zeros((8, 64), np.uint8), 'have shape (8, 64)'),
    (np.zeros((8, 8, 8, 4), np.uint8), 'have shape (8, 8, 8, 4)'),
])
def test_fid_refuses_samples_that_are_not_images(tmp_path, capsys, arr, needle):
    "Floats in [-1, 1] were read as 0/1 pixels (an FID of black images); now one line, exit 2, nothing written."
    p = tmp_path / 'samples.npz'; np.savez(p, arr_0=arr)
    code, out, err = cli(cli_fid, [p, '--json', tmp_path / 'r.json'], capsys)
    assert code == 2 and out == ''
    line = one_line(err, needle)
    assert str(p) in line and not (tmp_path / 'r.json').exists()


def test_fid_takes_whole_numbers_of_any_dtype():
    from meanflow_nb.fid import _as_images
    a = np.arange(8 * 4 * 4).reshape(8, 4, 4, 1) % 256
    for dt in (np.int64, np.float32, np.uint16):
        out = _as_images(a.astype(dt), 'x')
        assert out.dtype == np.uint8 and np.array_equal(out, a)


# ---------------------------------------------------------------- no room: file-size limit, full disk, memory

FSIZE = ("import resource, signal, sys\n"
         "from meanflow_nb.cli import cli_train\n"
         "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                          # as Python sets it: the write fails with EFBIG\n"
         "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))\n"
         "cli_train(sys.argv[2:])\n")


def test_file_size_limit_during_a_checkpoint_is_one_line(run, tmp_path):
    "RLIMIT_FSIZE below a checkpoint's size: exit 2, one line naming the file and the limit; the old checkpoints intact."
    script = tmp_path / 'fsize.py'; script.write_text(FSIZE)
    limit = (run / 'ckpt_00000020.pt').stat().st_size // 2
    before = {k: v for k, v in snap(run).items() if k.startswith('ckpt_')}
    r = subprocess.run([sys.executable, str(script), str(limit), *TOY, '--steps', '30', '--resume', '--out', str(run)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last_line(r.stderr, f'error: cannot write {run / "ckpt_00000030.pt"}: it would pass the file-size limit of this process '
                        f'({limit:,} bytes; ulimit -f)')
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt_')} == before
    assert not list(run.glob('*.tmp')) and not list(run.glob('.*.tmp'))


def test_full_disk_or_no_memory_during_a_checkpoint_is_one_line(run, capsys, monkeypatch):
    "ENOSPC half-way through torch.save, then a MemoryError while hashing the state: exit 2, one line, nothing lost."
    import errno
    import meanflow_nb.checkpoint as C
    before = snap(run); ckpts = {k: v for k, v in before.items() if k.startswith('ckpt_')}
    real_save = torch.save
    def full(obj, f, *a, **k): f.write(b'x' * 1000); raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 2
    last_line(err, f'error: cannot write {run / "ckpt_00000030.pt"}: the disk is full (')
    assert 'ckpt_00000030.pt was not written, the files beside it are unchanged' in err
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt_')} == ckpts and not list(run.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)
    def no_memory(st): raise MemoryError()
    monkeypatch.setattr(C, 'state_digest', no_memory)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 2
    last_line(err, 'error: out of memory: lower the batch size (--global_batch or --micro_batch of mf-train')
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt_')} == ckpts


# ---------------------------------------------------------------- a rank whose peer never comes

@pytest.mark.parametrize('rank', [0, 1])
def test_a_missing_peer_is_a_bounded_explained_wait(tmp_path, rank):
    """WORLD_SIZE=2 and only one rank started, --dist_timeout 5: a line within seconds saying how many joined, of how many,
    and how long it waits; then one error line and exit 2 after about 5 s (not 600 s of silence and a traceback)."""
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = dict(ENV, WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK='0', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(port))
    out = tmp_path / 'o'
    p = subprocess.Popen([sys.executable, '-m', 'meanflow_nb.train', *TOY, '--steps', '10', '--dist_timeout', '5', '--out', str(out)],
                         stderr=subprocess.PIPE, text=True, env=env)
    first = p.stderr.readline(); t_first = time.monotonic()
    rest = p.stderr.read(); code = p.wait(timeout=120); t_end = time.monotonic()
    joined = '1 of 2 ranks joined' if rank == 0 else 'no answer yet from rank 0, which hosts the rendezvous'
    assert first.startswith(f'rank {rank}: {joined} at 127.0.0.1:{port}; waiting up to ') and \
        '(--dist_timeout 5 s)' in first, first + rest
    assert code == 2 and t_end - t_first < 30, (code, rest)
    assert 'Traceback' not in rest and len(rest.strip().splitlines()) == 1, rest
    assert rest.startswith(f'error: rank {rank}: {"only 1 of 2 ranks joined" if rank == 0 else "rank 0 never answered"} '
                           f'at 127.0.0.1:{port} within 5 s (--dist_timeout)'), rest
    assert not out.exists()


@pytest.mark.parametrize('flags,needle', [
    (['--resolution', '0'], '--resolution must be >= 1, got 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--shard-size', '-3'], '--shard-size must be >= 1, got -3'),
    (['--num-workers', '-1'], '--num-workers must be >= 0, got -1'),
    (['--limit', '0'], '--limit must be >= 1'),
    (['--device', 'gpu7'], "--device must be a torch device such as cpu, cuda or cuda:1, got 'gpu7'"),
])
def test_latents_numbers_are_refused_before_the_vae_loads(tmp_path, capsys, monkeypatch, flags, needle):
    "mf-latents flags out of range: exit 2, one line, before any VAE is loaded or anything written."
    import meanflow_nb.data as D
    monkeypatch.setattr(D, 'load_vae', lambda *a, **k: pytest.fail('the VAE was loaded'))
    (tmp_path / 'imgs' / 'a').mkdir(parents=True)
    code, _, err = cli(cli_latents, ['--data', tmp_path / 'imgs', '--out', tmp_path / 'lat', *flags], capsys)
    assert code == 2
    one_line(err, needle)
    assert not (tmp_path / 'lat').exists()


# ---------------------------------------------------------------- small writes, the sample shape, rank 0's failed save, background saves

def test_torn_log_row_on_a_full_disk_is_one_line_and_resume_survives_it(run, capsys, monkeypatch):
    "ENOSPC half-way through a log.jsonl row: exit 2, one line naming the file; the torn row is skipped, --resume drops it."
    import errno
    ckpts = {k: v for k, v in snap(run).items() if k.startswith('ckpt_')}
    real = os.write
    def full(fd, data):
        if bytes(data).startswith(b'{"step": 25'):
            real(fd, bytes(data)[:12]); raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd, data)
    monkeypatch.setattr(os, 'write', full)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    monkeypatch.setattr(os, 'write', real)
    assert code == 2
    last_line(err, f'error: cannot write {run / "log.jsonl"}: the disk is full (')
    assert 'the checkpoints are kept and --resume goes on from the newest' in err
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt_')} == ckpts
    assert (run / 'log.jsonl').read_text().endswith('{"step": 25,') and [r['step'] for r in read_log(run)][-1] == 20
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 0, err
    assert log_steps(run) == [5, 10, 15, 20, 25, 30]                     # every line parses, every step once


def test_full_disk_for_a_figure_is_one_line(run, tmp_path, capsys, monkeypatch):
    "samples.png on a full disk in the final evaluation: exit 2, one line, no torn or stray file; --resume evaluates."
    import errno
    from matplotlib.figure import Figure
    real = Figure.savefig
    def full(self, f, *a, **k): f.write(b'\x89PNG half'); raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(Figure, 'savefig', full)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    monkeypatch.setattr(Figure, 'savefig', real)
    assert code == 2
    last_line(err, f'error: cannot write {run / "samples.png"}: the disk is full (')
    assert ckpt_steps(run) == [10, 20, 30] and not list(run.glob('.*.tmp'))
    assert json.loads((run / 'metrics.json').read_text())['steps'] == 20              # the old run's, not mixed
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)   # evaluates what is there
    assert code == 0, err
    assert json.loads((run / 'metrics.json').read_text())['steps'] == 30 and (run / 'samples.png').stat().st_size > 1000


def test_a_read_only_run_folder_after_startup_is_one_line(run, capsys, monkeypatch):
    "The folder turns read-only during training (EROFS on the next log row): exit 2, one line naming the file."
    import errno
    import meanflow_nb.checkpoint as C
    real = C.os.open
    def ro(p, flags, *a):
        if str(p).endswith('log.jsonl'): raise OSError(errno.EROFS, 'Read-only file system')
        return real(p, flags, *a)
    monkeypatch.setattr(C.os, 'open', ro)
    code, _, err = cli(cli_train, TOY + ['--steps', '30', '--resume', '--out', run], capsys)
    assert code == 2
    last_line(err, f'error: cannot write {run / "log.jsonl"}: Read-only file system: make {run} writable')


def latent_run(tmp_path):
    "A 2-step DiT-T/2 run on a hand-made latent folder: `(run folder, latent folder)`."
    lat, out = fake_latents(tmp_path / 'lat'), tmp_path / 'lrun'
    try: cli_train(['--preset', 'digits', '--model', 'DiT-T/2', '--data', 'latents', '--data_path', str(lat),
                    '--num_classes', '2', '--global_batch', '4', '--steps', '2', '--ckpt_every', '2', '--eval_samples', '4',
                    '--no-progress', '--out', str(out)])
    except SystemExit as ex: assert ex.code == 0
    return out, lat


def test_sample_shape_is_stored_and_used_when_the_data_is_gone(tmp_path, capsys):
    """A latent run's checkpoint stores its sample shape: mf-sample needs neither the data folder nor --shape; a --shape
    that disagrees is one line; an older checkpoint (no shape stored) without its data is one line naming --shape."""
    out, lat = latent_run(tmp_path)
    st = load_checkpoint(out / 'ckpt_00000002.pt')
    assert st['sample_shape'] == [4, 8, 8]
    shutil.rmtree(lat)
    cfg, model, shape, step = load_run(out)                        # neither the data folder nor --shape needed
    assert shape == (4, 8, 8) and step == 2
    code, _, err = cli(cli_sample, [out, '--shape', '4,16,16', '--out', tmp_path / 's2', '-n', '4', '--no-progress'], capsys)
    assert code == 2
    one_line(err, 'was built for samples of shape (4, 8, 8) (--shape 4,8,8), not (4, 16, 16); leave out --shape')
    old = {k: v for k, v in st.items() if k not in ('sample_shape', 'sha256')}
    torch.save({**old, 'sha256': state_digest(old)}, out / 'ckpt_00000002.pt')             # as runs before it wrote them
    code, _, err = cli(cli_sample, [out, '--out', tmp_path / 's3', '-n', '4', '--no-progress'], capsys)
    assert code == 2
    one_line(err, "stores no sample shape (a run from before it was stored) and its data 'latents' is not here to tell; "
                  "pass --shape C,H,W")
    assert load_run(out, shape=(4, 8, 8))[2] == (4, 8, 8)
    bad = {**old, 'sample_shape': [4, -8]}
    torch.save({**bad, 'sha256': state_digest(bad)}, out / 'ckpt_00000002.pt')
    with pytest.raises(RunError, match='its sample_shape is'): load_checkpoint(out / 'ckpt_00000002.pt')


FAILS_ON_RANK_0 = ("import errno, os, sys, torch\n"
                   "from meanflow_nb.cli import cli_train\n"
                   "what, argv = sys.argv[1], sys.argv[2:]\n"
                   "save, write = torch.save, os.write\n"
                   "def full(): return OSError(errno.ENOSPC, 'No space left on device')\n"
                   "def failing_save(obj, f, *a, **k):\n"
                   "    if obj.get('step') == 20: raise full()\n"
                   "    return save(obj, f, *a, **k)\n"
                   "def failing_write(fd, b):\n"
                   "    if bytes(b).startswith(b'{\"step\": 15,'): raise full()\n"
                   "    return write(fd, b)\n"
                   "if int(os.environ['RANK']) == 0:\n"
                   "    if what == 'log': os.write = failing_write\n"
                   "    else: torch.save = failing_save\n"
                   "cli_train(argv)\n")


@pytest.mark.parametrize('what', ['background save', 'foreground save', 'log'])
def test_a_failed_write_on_rank_0_stops_both_gloo_ranks_with_one_line(tmp_path, what):
    """Rank 0's checkpoint of step 20 (in the background or in the loop) or its log row of step 15 fails (a full disk):
    both gloo ranks exit 2 with the same line at once (rank 1 does not wait out --dist_timeout), the checkpoint of step
    10 is intact. The ranks are started as torchrun would, but by hand: torchrun would kill rank 1 as soon as rank 0
    ended, before it said anything."""
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    script = tmp_path / 'hook.py'; script.write_text(FAILS_ON_RANK_0)
    out = tmp_path / 'o'
    t = time.monotonic()
    bg = 'false' if what == 'foreground save' else 'true'
    ps = [subprocess.Popen([sys.executable, str(script), what, *TOY, '--steps', '30', '--param_check_every', '0',
                            '--async_ckpt', bg, '--out', str(out)], stderr=subprocess.PIPE, text=True,
                           env=dict(ENV, WORLD_SIZE='2', RANK=str(k), LOCAL_RANK=str(k), LOCAL_WORLD_SIZE='2',
                                    MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))) for k in (0, 1)]
    errs = [p.communicate(timeout=240)[1] for p in ps]
    assert time.monotonic() - t < 120, errs                                   # not the 600 s of --dist_timeout
    line = f'error: cannot write {out / ("log.jsonl" if what == "log" else "ckpt_00000020.pt")}: the disk is full ('
    for p, err in zip(ps, errs):
        assert p.returncode == 2, errs
        assert len(err.strip().splitlines()) == 1 and err.startswith(line), errs   # one line from each rank
    assert ckpt_steps(out) == [10] and not list(out.glob('*.tmp'))
    load_checkpoint(out / 'ckpt_00000010.pt')


def test_background_saves_write_the_same_checkpoints(tmp_path, capsys):
    "async_ckpt on and off: the same weights, EMA, optimiser state and digest in every checkpoint (the config aside)."
    for bg in ('true', 'false'):
        code, _, err = cli(cli_train, TOY + ['--steps', '20', '--async_ckpt', bg, '--out', tmp_path / bg], capsys)
        assert code == 0, err
    assert ckpt_steps(tmp_path / 'true') == ckpt_steps(tmp_path / 'false') == [10, 20]
    for p in list_checkpoints(tmp_path / 'false'):
        fg, bgst = load_checkpoint(p), load_checkpoint(tmp_path / 'true' / p.name)
        assert bgst['config']['async_ckpt'] is True and fg['config']['async_ckpt'] is False
        assert state_digest({**bgst, 'config': fg['config']}) == fg['sha256']   # same content, field for field
        for k in fg['model']: assert torch.equal(fg['model'][k], bgst['model'][k])


def test_a_slow_save_in_the_background_does_not_stop_the_steps(tmp_path, capsys, monkeypatch):
    """A save that takes 4 s: in the background the ten steps after it go on (the log's clock from step 10 to 20 holds
    the steps only); in the loop they wait for it. Both runs end with both checkpoints on disk."""
    import meanflow_nb.checkpoint as C
    real = C.save_checkpoint
    def slow(path, state): time.sleep(4.0); return real(path, state)
    monkeypatch.setattr(C, 'save_checkpoint', slow)
    gap = {}
    for bg in ('true', 'false'):
        out = tmp_path / bg
        code, _, err = cli(cli_train, TOY + ['--steps', '20', '--async_ckpt', bg, '--out', out], capsys)
        assert code == 0, err
        sec = {r['step']: r['sec'] for r in read_log(out)}
        gap[bg] = sec[20] - sec[10]
        assert ckpt_steps(out) == [10, 20]
    assert gap['false'] >= 4.0 and gap['true'] < gap['false'] - 2.5, gap


def test_a_failing_background_save_stops_the_run_with_one_line(run, capsys, monkeypatch):
    "ENOSPC in the background save of step 30: the run stops at the next step with one line; step 20's checkpoint stays."
    import errno
    ckpts = {k: v for k, v in snap(run).items() if k.startswith('ckpt_')}
    real = torch.save
    def full(obj, f, *a, **k):
        if obj['step'] == 30: f.write(b'x' * 100); raise OSError(errno.ENOSPC, 'No space left on device')
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full)
    code, _, err = cli(cli_train, TOY + ['--steps', '40', '--resume', '--out', run], capsys)
    assert code == 2
    last_line(err, f'error: cannot write {run / "ckpt_00000030.pt"}: the disk is full (')
    assert {k: v for k, v in snap(run).items() if k.startswith('ckpt_')} == ckpts and not list(run.glob('*.tmp'))
