"""Check the distributions a release would publish.

    python .ci/check_dists.py [--outdir DIR]     (default: a temporary folder, removed afterwards)

1. `python -m build` builds the sdist, then the wheel from the sdist; setuptools must not warn about package data;
2. `twine check --strict` passes (the README renders as the package page), and the metadata carries the version of
   settings.ini, the license expression and the LICENSE file; the sdist holds LICENSE, CHANGELOG.md and the assets;
3. a fresh venv installs the **sdist** (not editable) and, from outside the repository, imports the package, finds
   the digits classifier in its own copy (byte-identical to the repository's) and loads it, runs `mf-train --help`
   and a 20-step toy run.
The fresh venv borrows this interpreter's installed dependencies through a .pth file, so torch is not installed
twice; meanflow_nb itself comes only from the sdist (`--no-deps --ignore-installed`)."""
import argparse, configparser, email, json, os, re, shutil, subprocess, sys, sysconfig, tarfile, tempfile, time, zipfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(root / 'settings.ini', encoding='utf-8'); cfg = cfg['DEFAULT']
name, version = cfg['lib_name'], cfg['version']
ASSET_WARNING = re.compile(r'absent from the `packages` configuration|no files found matching|[Ww]arning:.*LICENSE')
start = time.time()

def fail(msg: str):
    print(f'FAIL: {msg}'); sys.exit(1)

def step(msg: str): print(f'-- [{time.time() - start:5.1f}s] {msg}', flush=True)

def run(*cmd, **kw) -> str:
    "Run `cmd`; fail with its output on a non-zero exit; return stdout and stderr together."
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode: fail(f'{" ".join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}')
    return res.stdout + res.stderr

def check_build(out: Path) -> tuple[Path, Path, bool]:
    # pyproject.toml asks for setuptools >= 77: where this interpreter has it (CI's venv does), build without fetching
    # it into an isolated environment twice
    try: import setuptools; isolate = int(setuptools.__version__.split('.')[0]) < 77
    except ImportError: isolate = True
    step(f'python -m build: the sdist, then the wheel built from it ({"isolated" if isolate else "no isolation"})')
    log = run(sys.executable, '-m', 'build', *([] if isolate else ['--no-isolation']), '--outdir', out, root)
    if m := ASSET_WARNING.search(log): fail(f'the build warns: {log[max(0, m.start() - 200):m.end() + 200]}')
    sdist, wheel = out / f'{name}-{version}.tar.gz', out / f'{name}-{version}-py3-none-any.whl'
    for f in (sdist, wheel):
        if not f.is_file(): fail(f'no {f.name} in {sorted(p.name for p in out.iterdir())}')
    return sdist, wheel, isolate

def check_contents(sdist: Path, wheel: Path):
    step('twine check --strict, metadata and contents')
    run(sys.executable, '-m', 'twine', 'check', '--strict', sdist, wheel)
    assets = sorted(p.relative_to(root).as_posix() for p in (root / name / 'assets').iterdir() if p.is_file())
    with tarfile.open(sdist) as t: snames = {n.split('/', 1)[1] for n in t.getnames() if '/' in n}
    missing = [f for f in ['LICENSE', 'CHANGELOG.md', 'README.md', 'settings.ini', 'setup.py', 'pyproject.toml', *assets] if f not in snames]
    if missing: fail(f'the sdist lacks {missing}')
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
        meta = email.message_from_string(z.read(f'{name}-{version}.dist-info/METADATA').decode())
    if f'{name}-{version}.dist-info/licenses/LICENSE' not in wnames: fail('the wheel lacks dist-info/licenses/LICENSE')
    if missing := [a for a in assets if a not in wnames]: fail(f'the wheel lacks {missing}')
    got = {k: meta.get(k) for k in ('Version', 'License-Expression', 'License-File')}
    if got != {'Version': version, 'License-Expression': 'Apache-2.0', 'License-File': 'LICENSE'}: fail(f'wheel metadata: {got}')
    body = meta.get_payload()
    if rel := re.findall(r'!\[[^\]]*\]\((?!https?://)([^)]+)\)|<img[^>]*src="(?!https?://)([^"]+)"', body):
        fail(f'the package page has relative images: {rel}')

def check_sdist_install(sdist: Path, tmp: Path, isolate: bool):
    step('a fresh venv installs the sdist')
    env_dir = tmp / 'venv'
    run(sys.executable, '-m', 'venv', '--without-pip', env_dir)  # this interpreter's pip installs into it (--python)
    py, bin_ = env_dir / 'bin' / 'python', env_dir / 'bin'
    site = Path(run(py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib'))  # this interpreter's dependencies
    (site / '_ci_dependencies.pth').write_text('\n'.join(deps) + '\n')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env['PATH'] = f'{bin_}{os.pathsep}{env["PATH"]}'
    log = run(sys.executable, '-m', 'pip', '--python', py, 'install', '-v', '--no-deps', '--ignore-installed',
              *([] if isolate else ['--no-build-isolation']), sdist, env=env, cwd=tmp)
    if m := ASSET_WARNING.search(log): fail(f'installing the sdist warns: {log[max(0, m.start() - 200):m.end() + 200]}')
    step('the installed copy: import, version, assets, digits classifier')
    code = f'''import hashlib, pathlib, sys, meanflow_nb
from meanflow_nb.eval import DIGITS_CLASSIFIER_PATH as w, load_digits_classifier
site = pathlib.Path({str(site)!r}).resolve()
assert pathlib.Path(meanflow_nb.__file__).resolve().is_relative_to(site), meanflow_nb.__file__
assert meanflow_nb.__version__ == {version!r}, meanflow_nb.__version__
assert w.resolve().is_relative_to(site) and w.is_file(), w
same = hashlib.sha256(w.read_bytes()).hexdigest() == hashlib.sha256(pathlib.Path({str(root / name / 'assets' / 'digits_classifier.safetensors')!r}).read_bytes()).hexdigest()
assert same, 'the installed classifier differs from the repository copy'
n = sum(p.numel() for p in load_digits_classifier().parameters())
print(f'meanflow_nb {{meanflow_nb.__version__}} from {{meanflow_nb.__file__}}; digits classifier: {{n}} parameters')'''
    print(run(py, '-c', code, env=env, cwd=tmp).strip().splitlines()[-1])
    step('mf-train --help, then a 20-step toy run')
    mf = bin_ / 'mf-train'
    if not mf.is_file(): fail('the sdist install has no mf-train')
    if 'usage: mf-train' not in run(mf, '--help', env=env, cwd=tmp): fail('mf-train --help prints no usage')
    out = run(mf, '--preset', 'toy2d', '--steps', 20, '--eval_samples', 2000, '--baseline_fm', 'false', '--no-progress',
              '--out', tmp / 'toy', env=env, cwd=tmp)
    res = json.loads(out[out.index('{'):out.rindex('}') + 1])
    if res.get('steps') != 20 or not (tmp / 'toy' / 'samples.png').is_file(): fail(f'the toy run: {res}')
    print(f"toy run: 20 steps, 1-NFE SWD {res['swd_1nfe']:.3f}")

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--outdir', type=Path, default=None, help='keep the sdist and the wheel here (default: a temporary folder)')
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = a.outdir.resolve() if a.outdir else tmp / 'dist'
        if out.exists(): shutil.rmtree(out)
        sdist, wheel, isolate = check_build(out)
        check_contents(sdist, wheel)
        check_sdist_install(sdist, tmp, isolate)
    step(f'distributions OK: {sdist.name}, {wheel.name}')

if __name__ == '__main__': main()
