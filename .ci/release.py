"""Cut a release of meanflow_nb in one command, from a clean, up-to-date `main` that passed CI:

    python .ci/release.py [--part 0|1|2] [--no-push]

1. bumps the version with nbdev's `bump_version` (`--part`: 0 major, 1 minor, 2 patch) in settings.ini, the one
   place it lives, and writes it into `meanflow_nb/__init__.py` with nbdev's `update_version`;
2. moves CHANGELOG.md's "Unreleased" section under a heading for the new version (and leaves an empty "Unreleased");
3. commits "Release X.Y.Z", tags it `X.Y.Z` (nbdev's tag format, as `nbdev_release_git` makes) and pushes both.

The pushed tag starts .github/workflows/release.yaml, which builds the sdist and the wheel, checks them and publishes
them to PyPI. `nbdev_bump_version` is not called: it rewrites settings.ini from its parsed values and drops every
comment in it. Without GitHub, `nbdev_pypi` builds and uploads from this machine (twine credentials needed).
A failed check (branch, clean tree, remote, tag, changelog) prints one line on stderr and exits 2 before any change."""
import argparse, datetime, re, subprocess, sys
from pathlib import Path

UNRELEASED = '## Unreleased'

def fail(msg: str):
    print(f'error: {msg}', file=sys.stderr); sys.exit(2)

def git(*args: str, cwd: Path) -> str:
    res = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode: fail(f'git {" ".join(args)}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}')
    return res.stdout.strip()

def date_changelog(text: str, version: str, date: str) -> str:
    "Move the entries under 'Unreleased' to a new `version` section, leaving an empty 'Unreleased' above it."
    parts = re.split(r'^(## .*)$', text, flags=re.MULTILINE)  # [head, heading, body, heading, body, ...]
    i = next((k for k in range(1, len(parts), 2) if parts[k].strip() == UNRELEASED), None)
    if i is None: fail(f'CHANGELOG.md has no "{UNRELEASED}" section')
    body = parts[i + 1]
    if not body.strip(): fail('CHANGELOG.md: the "Unreleased" section is empty: say what this release changes')
    if any(parts[k].split()[1] == version for k in range(1, len(parts), 2)): fail(f'CHANGELOG.md already has {version}')
    parts[i:i + 2] = [UNRELEASED, '\n\n', f'## {version} ({date})', body]
    return ''.join(parts)

def notes(text: str, version: str) -> str:
    "The CHANGELOG section of `version` (the GitHub release's notes)."
    m = re.search(rf'^## v?{re.escape(version)}(?:[ \t][^\n]*)?\n(.*?)(?=^## |\Z)', text, flags=re.MULTILINE | re.DOTALL)
    if not m or not m[1].strip(): fail(f'CHANGELOG.md has no notes for {version}')
    return m[1].strip()

def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog='release.py', description='Bump, date the changelog, commit, tag and push a release.')
    p.add_argument('--part', type=int, default=2, choices=(0, 1, 2), help='version part to bump: 0 major, 1 minor, 2 patch (default)')
    p.add_argument('--no-push', action='store_true', help='commit and tag locally, push nothing')
    p.add_argument('--remote', default='origin', help='the remote to push to (default origin)')
    p.add_argument('--notes', metavar='VERSION', help="print VERSION's changelog section and exit (the release workflow's notes)")
    a = p.parse_args(argv)
    if a.notes:
        print(notes((Path(__file__).resolve().parents[1] / 'CHANGELOG.md').read_text(encoding='utf-8'), a.notes.removeprefix('v')))
        return
    from nbdev.config import get_config, update_version
    from nbdev.release import bump_version
    cfg = get_config()
    root = Path(cfg.config_path)
    branch = git('rev-parse', '--abbrev-ref', 'HEAD', cwd=root)
    if branch != cfg.branch: fail(f'releases are cut from {cfg.branch}, this is {branch}')
    if git('status', '--porcelain', cwd=root): fail('the working tree has uncommitted changes: commit or stash them first')
    if not a.no_push:
        if a.remote not in git('remote', cwd=root).split(): fail(f'no git remote {a.remote!r} (use --remote or --no-push)')
        git('fetch', '-q', a.remote, branch, cwd=root)
        if git('rev-list', '--count', 'HEAD..FETCH_HEAD', cwd=root) != '0': fail(f'{branch} is behind {a.remote}/{branch}: pull first')
    old = cfg.version
    new = bump_version(old, a.part)
    if git('tag', '--list', new, cwd=root): fail(f'tag {new} exists already')
    log = root / 'CHANGELOG.md'
    if not log.exists(): fail('CHANGELOG.md is missing')
    changelog = date_changelog(log.read_text(encoding='utf-8'), new, datetime.date.today().isoformat())
    ini = root / 'settings.ini'
    txt, n = re.subn(r'^(version\s*=\s*)\S+[ \t]*$', rf'\g<1>{new}', ini.read_text(encoding='utf-8'), count=1, flags=re.MULTILINE)
    if n != 1: fail('settings.ini has no version line')
    ini.write_text(txt, encoding='utf-8')
    log.write_text(changelog, encoding='utf-8')
    get_config.cache_clear()
    update_version(get_config().lib_path)
    git('add', 'settings.ini', 'CHANGELOG.md', str(Path(cfg.lib_path) / '__init__.py'), cwd=root)
    git('commit', '-q', '-m', f'Release {new}', cwd=root)
    git('tag', '-a', new, '-m', f'Release {new}', cwd=root)
    print(f'{old} -> {new}: committed and tagged {new}')
    if a.no_push:
        print(f'not pushed; to publish: git push --atomic {a.remote} {branch} {new}')
        return
    git('push', '--atomic', a.remote, branch, new, cwd=root)
    print(f'pushed {branch} and tag {new} to {a.remote}: .github/workflows/release.yaml builds and publishes it')

if __name__ == '__main__': main()
