"""Make README.md's relative links absolute, so that it renders as the package page (PyPI has no repository files).

    python .ci/readme_links.py [--check]

Images (`![alt](nbs/images/x.png)`, `<img src="...">`) become raw.githubusercontent.com URLs of `branch` in
`git_url` (settings.ini); other relative links become github.com/.../blob/<branch>/... pages. Fenced code blocks
are left alone. Idempotent. `--check` changes nothing and exits 1 if a relative link is left (tests/test_release.py
checks the same)."""
import configparser, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
MD_LINK = re.compile(r'(!?)\[((?:[^\]\\]|\\.)*)\]\(\s*([^)\s]+)([^)]*)\)')  # (!)[text](target "title")
IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=)(["\'])(.*?)\2', re.IGNORECASE)
ABSOLUTE = re.compile(r'^(?:[a-z][a-z0-9+.-]*:|#|//)', re.IGNORECASE)  # a scheme, an anchor, or protocol-relative

def bases() -> tuple[str, str]:
    "(raw base for images, blob base for pages), from `git_url` and `branch` in settings.ini."
    c = configparser.ConfigParser(delimiters=['=']); c.read(root / 'settings.ini', encoding='utf-8'); c = c['DEFAULT']
    git = c['git_url'].rstrip('/')
    m = re.fullmatch(r'https://github\.com/([^/]+)/([^/]+?)(?:\.git)?', git)
    if not m: sys.exit(f'error: git_url {git!r} is not a https://github.com/<user>/<repo> URL')
    return (f'https://raw.githubusercontent.com/{m[1]}/{m[2]}/{c["branch"]}/', f'https://github.com/{m[1]}/{m[2]}/blob/{c["branch"]}/')

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
    check = '--check' in sys.argv[1:]
    readme = root / 'README.md'
    text = readme.read_text(encoding='utf-8')
    new, found = rewrite(text, *bases())
    if check:
        if found: print(f'README.md has relative links: {found}; run python .ci/readme_links.py'); sys.exit(1)
        return
    if new != text: readme.write_text(new, encoding='utf-8')
    print(f'README.md: {len(found)} relative links made absolute' if found else 'README.md: no relative links')

if __name__ == '__main__': main()
