"""The release path: the LICENSE, one version source, a README that renders off the repository, the release workflow
and the release script (bump, changelog, commit, tag)."""
import configparser, datetime, hashlib, json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CFG = configparser.ConfigParser(delimiters=['=']); CFG.read(ROOT / 'settings.ini', encoding='utf-8'); CFG = CFG['DEFAULT']
ENV = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@example.org', GIT_COMMITTER_NAME='t',
           GIT_COMMITTER_EMAIL='t@example.org', GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM='1')


def test_license_is_apache2_with_our_copyright():
    "LICENSE is apache.org's text (MD5 of the canonical LICENSE-2.0.txt) with the appendix's placeholder filled in."
    text = (ROOT / 'LICENSE').read_text(encoding='utf-8')
    assert CFG['license'] == 'apache2'
    line = f"   Copyright {CFG['copyright']}\n"
    assert text.count(line) == 1, 'the copyright line of settings.ini is not in LICENSE'
    canonical = text.replace(line, '   Copyright [yyyy] [name of copyright owner]\n')
    assert hashlib.md5(canonical.encode()).hexdigest() == '3b83ef96387f14655fc854ddc3c6bd57'


def _version_literals(text, version):
    return re.findall(rf'(?<![\w.]){re.escape(version)}(?![\w.])', text)


def test_version_has_one_source():
    "settings.ini's version reaches __init__ and setup.py; no other tracked file hard-codes it."
    version = CFG['version']
    init = (ROOT / CFG['lib_path'] / '__init__.py').read_text()
    assert re.search(r'^__version__ = "(.*)"$', init, re.MULTILINE)[1] == version
    res = subprocess.run([sys.executable, 'setup.py', '--version'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == version, res.stderr[-1000:]
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    allowed = {'settings.ini', f"{CFG['lib_path']}/__init__.py", 'CHANGELOG.md'}
    found = []
    for f in files:
        p = ROOT / f
        if f in allowed or not p.is_file() or p.suffix not in {'.py', '.ini', '.toml', '.cfg', '.yaml', '.yml', '.md', '.txt', '.ipynb', ''}:
            continue
        text = p.read_text(encoding='utf-8', errors='replace')
        if p.suffix == '.ipynb':  # sources only: outputs are measurements, not declarations
            text = '\n'.join(''.join(c['source']) for c in json.loads(text)['cells'])
        if _version_literals(text, version) or re.search(r'^\s*__version__\s*=', text, re.MULTILINE): found.append(f)
    assert not found, f'the version is hard-coded in {found}; it belongs in settings.ini only'
    assert _version_literals('x = "1.2.3"', '1.2.3') and not _version_literals('1.2.30 or 11.2.3', '1.2.3')


# the targets of markdown links/images and of <img src>, outside fenced code blocks
_LINK = re.compile(r'!?\[(?:[^\]\\]|\\.)*\]\(\s*([^)\s]+)[^)]*\)|<img\b[^>]*?\bsrc=["\']([^"\']+)["\']', re.IGNORECASE)


def _targets(md):
    text = re.sub(r'^\s*(```|~~~).*?^\s*\1[^\n]*$', '', md, flags=re.MULTILINE | re.DOTALL)
    return [a or b for a, b in _LINK.findall(text)]


def test_readme_renders_off_the_repository():
    "No relative link or image in README (a package index has no repository files); the absolute ones exist here."
    assert _targets('![a](nbs/x.png) <img src="y.png"> [b](https://x.org/c)\n```\n![no](z.png)\n```\n') == \
        ['nbs/x.png', 'y.png', 'https://x.org/c']
    targets = _targets((ROOT / 'README.md').read_text(encoding='utf-8'))
    relative = [t for t in targets if not re.match(r'^(https?:|mailto:|#)', t)]
    assert not relative, f'relative links in README.md: {relative}; run python .ci/readme_links.py'
    user_repo = CFG['git_url'].removeprefix('https://github.com/').rstrip('/')
    ours = [re.sub(rf'^https://(raw\.githubusercontent\.com/{user_repo}|github\.com/{user_repo}/blob)/{CFG["branch"]}/', '', t)
            for t in targets if user_repo in t]
    assert len(ours) >= 4, ours  # the result figures at least
    missing = [t for t in ours if not (ROOT / t).is_file()]
    assert not missing, f'README links to files the repository lacks: {missing}'


def test_readme_links_pin_to_a_tag(tmp_path):
    "`readme_links.py --ref TAG` (the release workflow's step) moves every link into the repository to that tag."
    import shutil, subprocess, sys
    (tmp_path / '.ci').mkdir()
    shutil.copy(ROOT / '.ci' / 'readme_links.py', tmp_path / '.ci')
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    user_repo = CFG['git_url'].removeprefix('https://github.com/').rstrip('/')
    (tmp_path / 'README.md').write_text(
        f'![f](https://raw.githubusercontent.com/{user_repo}/main/nbs/images/a.png) ![g](nbs/images/b.png)\n'
        f'[c](https://github.com/{user_repo}/blob/main/CHANGELOG.md) [o](https://example.org/main/x.png)\n')
    r = subprocess.run([sys.executable, str(tmp_path / '.ci' / 'readme_links.py'), '--ref', '9.9.9'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = (tmp_path / 'README.md').read_text()
    assert out.count('/9.9.9/') == 3 and '/main/' in out.split('example.org')[1], out      # others' links untouched
    assert f'raw.githubusercontent.com/{user_repo}/9.9.9/nbs/images/b.png' in out
    assert '--ref "$GITHUB_REF_NAME"' in (ROOT / '.github' / 'workflows' / 'release.yaml').read_text()


def _gh_filter(pattern):
    "A GitHub Actions tag filter as a regex (`*` any run of non-slashes, `+` one or more of the previous, `.` literal)."
    return re.compile(pattern.replace('.', r'\.').replace('*', '[^/]*') + '$')


def test_release_workflow():
    "release.yaml parses, runs on version tags (the bare form the release script pushes), checks then publishes."
    wf = yaml.safe_load((ROOT / '.github' / 'workflows' / 'release.yaml').read_text())
    on = wf.get('on', wf.get(True))  # YAML 1.1 reads the key `on` as True
    tags = on['push']['tags']
    assert set(on) == {'push'} and 'branches' not in on['push']
    for tag, ok in [('0.2.0', True), ('v1.10.3', True), ('1.0.0rc1', True), ('latest', False), ('1.2', False)]:
        assert any(_gh_filter(p).match(tag) for p in tags) == ok, tag
    jobs = wf['jobs']
    build_steps = ' '.join(s.get('run', '') for s in jobs['build']['steps'])
    assert 'python .ci/check_dists.py --outdir dist' in build_steps and 'GITHUB_REF_NAME' in build_steps
    pub = jobs['publish']
    assert pub['needs'] == 'build' and pub['permissions'] == {'id-token': 'write'} and pub['environment']['name'] == 'pypi'
    assert any(s.get('uses', '').startswith('pypa/gh-action-pypi-publish@') for s in pub['steps'])
    assert wf['permissions'] == {'contents': 'read'}
    for script in re.findall(r'\.ci/[\w.]+', yaml.safe_dump(wf)): assert (ROOT / script).is_file(), script


def _release(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / '.ci' / 'release.py'), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def _git(cwd, *args):
    return subprocess.run(['git', *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=True).stdout.strip()


def test_release_script(tmp_path):
    "One command bumps settings.ini (comments kept) and __init__, dates the changelog, commits and tags; bad states exit 2."
    lib = CFG['lib_path']
    (tmp_path / lib).mkdir()
    for f in ['settings.ini', 'CHANGELOG.md', f'{lib}/__init__.py']: shutil.copy(ROOT / f, tmp_path / f)
    _git(tmp_path, 'init', '-q', '-b', CFG['branch']); _git(tmp_path, 'add', '-A'); _git(tmp_path, 'commit', '-qm', 'start')
    _git(tmp_path.parent, 'init', '-q', '--bare', str(tmp_path.parent / 'remote.git'))  # stands in for GitHub
    _git(tmp_path, 'remote', 'add', 'origin', str(tmp_path.parent / 'remote.git')); _git(tmp_path, 'push', '-q', 'origin', CFG['branch'])
    ini0, log0 = (tmp_path / 'settings.ini').read_text(), (tmp_path / 'CHANGELOG.md').read_text()
    major, minor, _ = map(int, CFG['version'].split('.'))
    new = f'{major}.{minor + 1}.0'

    (tmp_path / 'stray.txt').write_text('x')  # a dirty tree is refused before anything changes
    res = _release(tmp_path, '--part', '1', '--no-push')
    assert res.returncode == 2 and res.stderr.startswith('error:') and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (tmp_path / 'settings.ini').read_text() == ini0
    (tmp_path / 'stray.txt').unlink()

    res = _release(tmp_path, '--part', '1')  # the one command: bump, changelog, commit, tag, push
    assert res.returncode == 0, res.stderr
    ini1 = (tmp_path / 'settings.ini').read_text()
    assert ini1 == re.sub(r'^version = .*$', f'version = {new}', ini0, flags=re.MULTILINE) != ini0  # only the version
    assert f'__version__ = "{new}"' in (tmp_path / lib / '__init__.py').read_text()
    unreleased = log0.split('## Unreleased\n', 1)[1]
    head = log0.split('## Unreleased\n', 1)[0]
    assert (tmp_path / 'CHANGELOG.md').read_text() == f'{head}## Unreleased\n\n## {new} ({datetime.date.today()})\n{unreleased}'
    assert _git(tmp_path, 'status', '--porcelain') == ''
    assert _git(tmp_path, 'rev-list', '-n', '1', new) == _git(tmp_path, 'rev-parse', 'HEAD')
    assert _git(tmp_path, 'log', '-1', '--format=%s') == f'Release {new}'
    remote = dict(l.split('\t')[::-1] for l in _git(tmp_path, 'ls-remote', 'origin').splitlines())
    assert remote[f"refs/heads/{CFG['branch']}"] == remote[f'refs/tags/{new}^{{}}'] == _git(tmp_path, 'rev-parse', 'HEAD')

    res = _release(tmp_path, '--no-push')  # nothing new under "Unreleased": refused
    assert res.returncode == 2 and 'Unreleased' in res.stderr, res.stderr
    _git(tmp_path, 'checkout', '-qb', 'other')
    res = _release(tmp_path, '--no-push')
    assert res.returncode == 2 and 'releases are cut from' in res.stderr, res.stderr

    sys.path.insert(0, str(ROOT / '.ci'))
    try: import release
    finally: sys.path.remove(str(ROOT / '.ci'))
    assert release.notes((tmp_path / 'CHANGELOG.md').read_text(), new) == unreleased.strip()
