"""Make README.md's relative links absolute, so that it renders as the package page (PyPI has no repository files).

    python .ci/readme_links.py [--check] [--ref REF]

Images (`![alt](nbs/images/x.png)`, `<img src="...">`) become raw.githubusercontent.com URLs of `branch` in
`git_url` (settings.ini); other relative links become github.com/.../blob/<branch>/... pages. Fenced code blocks
are left alone. Idempotent. `--check` changes nothing and exits 1 if a relative link is left (tests/test_release.py
checks the same). `--ref 0.0.2` pins every link into the repository, absolute ones included, to that tag instead of
the branch: the release workflow runs it before building, so the package page shows the images of the very version
it describes (a later change on `main` cannot break or alter them)."""
import configparser, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
MD_LINK = re.compile(r'(!?)\[((?:[^\]\\]|\\.)*)\]\(\s*([^)\s]+)([^)]*)\)')  # (!)[text](target "title")
IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=)(["\'])(.*?)\2', re.IGNORECASE)
ABSOLUTE = re.compile(r'^(?:[a-z][a-z0-9+.-]*:|#|//)', re.IGNORECASE)  # a scheme, an anchor, or protocol-relative

def bases(ref: str | None = None) -> tuple[str, str]:
    "(raw base for images, blob base for pages), from `git_url` and `branch` in settings.ini (or `ref`)."
    c = configparser.ConfigParser(delimiters=['=']); c.read(root / 'settings.ini', encoding='utf-8'); c = c['DEFAULT']
    git = c['git_url'].rstrip('/')
    m = re.fullmatch(r'https://github\.com/([^/]+)/([^/]+?)(?:\.git)?', git)
    if not m: sys.exit(f'error: git_url {git!r} is not a https://github.com/<user>/<repo> URL')
    ref = ref or c['branch']
    return f'https://raw.githubusercontent.com/{m[1]}/{m[2]}/{ref}/', f'https://github.com/{m[1]}/{m[2]}/blob/{ref}/'


def pin(text: str, raw: str, blob: str) -> str:
    "Links into this repository at any branch or tag moved to the bases `raw` / `blob` (their ref)."
    for base in (raw, blob):
        head = base.rsplit('/', 2)[0] + '/'                                   # .../owner/repo/ or .../blob/
        text = re.sub(re.escape(head) + r'[\w.-]+/', base, text)
    return text

def absolute(target: str, image: bool, raw: str, blob: str) -> str:
    "`target` on the repository's branch; absolute targets, and `../` ones (outside the repository), unchanged."
    if ABSOLUTE.match(target) or target.startswith('../'): return target
    while target.startswith('./'): target = target[2:]
    return (raw if image else blob) + target.lstrip('/')

def rewrite(text: str, raw: str, blob: str) -> tuple[str, list[str]]:
    "`text` with relative links made absolute, and the relative targets it found."
    found, out, fence = [], [], None
    for line in text.splitlines(keepends=True):
        m = re.match(r'^\s*(`{3,}|~{3,})', line)
        if m and (fence is None or m[1][0] == fence[0] and len(m[1]) >= len(fence)):
            fence = m[1] if fence is None else None
        elif fence is None:
            def md(m):
                if not ABSOLUTE.match(m[3]): found.append(m[3])
                return f'{m[1]}[{m[2]}]({absolute(m[3], bool(m[1]), raw, blob)}{m[4]})'
            def img(m):
                if not ABSOLUTE.match(m[3]): found.append(m[3])
                return f'{m[1]}{m[2]}{absolute(m[3], True, raw, blob)}{m[2]}'
            line = IMG_SRC.sub(img, MD_LINK.sub(md, line))
        out.append(line)
    return ''.join(out), found

def main():
    args = sys.argv[1:]
    check = '--check' in args
    ref = args[args.index('--ref') + 1] if '--ref' in args and args.index('--ref') + 1 < len(args) else None
    if '--ref' in args and not ref: sys.exit('error: --ref needs a tag or branch name')
    readme = root / 'README.md'
    text = readme.read_text(encoding='utf-8')
    new, found = rewrite(text, *bases(ref))
    if ref: new = pin(new, *bases(ref))
    if check:
        if found: print(f'README.md has relative links: {found}; run python .ci/readme_links.py'); sys.exit(1)
        return
    if new != text: readme.write_text(new, encoding='utf-8')
    print(f'README.md: {len(found)} relative links made absolute' if found else 'README.md: no relative links',
          f'; links into the repository pinned to {ref}' if ref else '', sep='')

if __name__ == '__main__': main()
