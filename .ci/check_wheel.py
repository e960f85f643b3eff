"""Build a wheel, install it outside the repo, and check that every module, asset and console script came with it,
and that the installed (non-editable) copy loads the digits classifier from its own assets."""
import subprocess, sys, tempfile, zipfile, os
from pathlib import Path
root = Path(__file__).resolve().parents[1]
mods = sorted(p.relative_to(root).as_posix() for p in (root / 'meanflow_nb').rglob('*.py'))
assets = sorted(p.relative_to(root).as_posix() for p in (root / 'meanflow_nb' / 'assets').rglob('*') if p.is_file())
if 'meanflow_nb/assets/digits_classifier.safetensors' not in assets: sys.exit('FAIL: the repository lacks the digits classifier')
with tempfile.TemporaryDirectory() as d:
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', d, str(root)], check=True)
    whl = next(Path(d).glob('*.whl'))
    names = set(zipfile.ZipFile(whl).namelist())
    missing = [m for m in mods + assets if m not in names]
    if missing: sys.exit(f'FAIL: the wheel lacks {missing}')
    tgt = Path(d) / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(tgt), str(whl)], check=True)
    env = dict(os.environ, PYTHONPATH=str(tgt))
    code = ('import meanflow_nb, pathlib, sys; p = pathlib.Path(meanflow_nb.__file__); assert str(p).startswith(sys.argv[1]), p; print("imported", p)\n'
            'from meanflow_nb.eval import DIGITS_CLASSIFIER_PATH as w, load_digits_classifier\n'
            'assert str(w).startswith(sys.argv[1]) and w.is_file(), w\n'
            'n = sum(t.numel() for t in load_digits_classifier().parameters()); print("digits classifier", n, "parameters from", w)')
    subprocess.run([sys.executable, '-c', code, str(tgt)], check=True, cwd=d, env=env)
    scripts = sorted((tgt / 'bin').glob('mf-*'))
    if not scripts: sys.exit('FAIL: no console scripts in the wheel')
    subprocess.run([str(tgt / 'bin' / 'mf-train'), '--help'], check=True, cwd=d, env=env, stdout=subprocess.DEVNULL)
    print(f'wheel OK: {len(mods)} modules, {len(assets)} assets, scripts {[s.name for s in scripts]}')
