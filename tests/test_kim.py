"""Kim et al. through the trainer as users run it: `mf-train --method kim --kim_accel dtd`, and an exact resume of the
DTD curriculum (its state travels in the checkpoints)."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
SMALL = ['--preset', 'toy2d', '--method', 'kim', '--baseline_fm', 'false', '--eval_samples', '300', '--no-progress',
         '--model_kwargs', '{"hidden": 32, "depth": 2}', '--global_batch', '128']


def mf_train(*args, timeout=240):
    "The `mf-train` console script, as `python -m meanflow_nb.train` (same entry point, no install needed)."
    return subprocess.run([sys.executable, '-m', 'meanflow_nb.train', *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def ckpt(out, step):
    return torch.load(Path(out) / f'ckpt_{step:08d}.pt', map_location='cpu', weights_only=True)


ARGS = [*SMALL, '--kim_accel', 'dtd', '--dtd_clusters', '6', '--dtd_patience', '5', '--steps', '30',
        '--ckpt_every', '10', '--keep_ckpts', '10']


@pytest.fixture(scope='module')
def ref_run(tmp_path_factory):
    "One uninterrupted 30-step DTD + beta run from the command line, shared by the tests below."
    out = tmp_path_factory.mktemp('kim') / 'ref'
    res = mf_train(*ARGS, '--out', str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out, json.loads(res.stdout[res.stdout.index('{'):])


def cut_copy(ref, dst, drop_state=False):
    "A copy of the run as if it had been killed right after its step-10 checkpoint (optionally losing the DTD state)."
    shutil.copytree(ref, dst)
    (dst / 'log.jsonl').unlink()
    for p in dst.glob('ckpt_*.pt'):
        if int(p.stem.split('_')[1]) > 10: p.unlink()
        elif drop_state:
            st = torch.load(p, weights_only=True); st['loss'] = {}; st.pop('sha256', None); torch.save(st, p)  # as an older version wrote it
    return dst


def same(a, b): return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


def test_cli_kim_dtd_curriculum_runs_and_is_saved(ref_run):
    "`mf-train --method kim --kim_accel dtd` trains, and the curriculum advanced and was checkpointed."
    out, metrics = ref_run
    assert metrics['method'] == 'kim' and metrics['steps'] == 30
    hist = ckpt(out, 30)['loss']['dtd']['history']
    assert [s for _, s in hist] == [1, 2, 3, 4, 5, 6], hist                  # every cluster was reached
    assert all(0 < b - a <= 5 for (a, _), (b, _) in zip(hist, hist[1:])), hist  # no stage beyond the patience
    early = ckpt(out, 10)['loss']['dtd']
    assert 1 < early['stage'] < 6 and early['history'] == [h for h in hist if h[0] <= 10]


def test_resume_mid_curriculum_is_exact(ref_run, tmp_path):
    "Resume a copy cut at step 10 (mid-curriculum): the weights and the curriculum equal the uninterrupted run's."
    ref = ref_run[0]
    cut = cut_copy(ref, tmp_path / 'cut')
    res = mf_train(*ARGS, '--out', str(cut), '--resume')
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'resumed from step 10' in res.stderr
    a, b = ckpt(ref, 30), ckpt(cut, 30)
    assert same(a['loss'], b['loss'])
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], atol=0, rtol=0)


def test_resume_without_curriculum_state_differs(ref_run, tmp_path):
    "Control: the same resume from checkpoints that lost the DTD state (stage back to 1) trains different weights."
    ref = ref_run[0]
    cut = cut_copy(ref, tmp_path / 'cut', drop_state=True)
    res = mf_train(*ARGS, '--out', str(cut), '--resume')
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = ckpt(ref, 30), ckpt(cut, 30)
    assert not same(a['loss'], b['loss'])
    assert max((a['model'][k] - b['model'][k]).abs().max().item() for k in a['model']) > 1e-6
