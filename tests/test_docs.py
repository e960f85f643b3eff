"""The docs' content: every notebook opens with a title and a one-line description only (nbdev's front-matter
processor turns that first cell into front matter and drops anything else in it), the front page agrees with the
README, and the offline site built by `.ci/build_docs.py` (when `_docs/` exists) shows every page whole."""
import json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))


def cells(p): return json.loads(p.read_text(encoding='utf-8'))['cells']
def src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']


def first_cell_problem(text):
    "None if `text` is exactly `# Title`, a blank line and one `> description` line, else what is wrong."
    lines = text.strip('\n').split('\n')
    if not lines or not re.match(r'# \S', lines[0]): return 'does not start with a `# Title` line'
    rest = [l for l in lines[1:] if l.strip()]
    if len(rest) != 1 or not rest[0].startswith('> ') or len(rest[0]) < 4:
        return f'holds {len(rest)} non-blank lines after the title; it must hold one `> description` line only'
    return None


def test_first_cell_rule_can_fail():
    assert first_cell_problem('# T\n\n> one line') is None
    assert first_cell_problem('# T\n\n> one\n> two')
    assert first_cell_problem('# T\n\n> d\n\nan intro paragraph')
    assert first_cell_problem('> d')
    assert first_cell_problem('# T')


@pytest.mark.parametrize('nb', NBS, ids=lambda p: p.name)
def test_first_cell_is_title_and_description(nb):
    cs = cells(nb)
    assert cs[0]['cell_type'] == 'markdown', f'{nb.name}: the first cell must be markdown'
    problem = first_cell_problem(src(cs[0]))
    assert problem is None, f'{nb.name}: first cell {problem}; move the introduction into the next cell'
    intro = next((c for c in cs[1:] if c['cell_type'] == 'markdown'), None)
    assert intro is not None and len(src(intro).split()) >= 20, f'{nb.name}: no introduction after the title cell'


def test_index_numbers_are_the_readmes():
    "Every number in the front page's results section appears in README.md, and the front page maps every notebook."
    idx = '\n'.join(src(c) for c in cells(ROOT / 'nbs' / 'index.ipynb'))
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    res = idx.split('## Headline results', 1)[1].split('\n## ', 1)[0]
    nums = set(re.findall(r'\d+\.\d+', res))
    assert len(nums) >= 6
    missing = sorted(n for n in nums if n not in readme)
    assert not missing, f'index.ipynb results not in README.md: {missing}'
    for p in NBS:
        if p.name != 'index.ipynb': assert f'({p.name})' in idx, f'index.ipynb does not link {p.name}'


# ---- the built site (`python .ci/build_docs.py`; CI builds it before pytest) ----
import os
from html.parser import HTMLParser
from urllib.parse import urlsplit, unquote

SITE = ROOT / '_docs'
need_site = pytest.mark.skipif(not (SITE / 'pages.json').exists() and not os.environ.get('CI'),
                               reason='no _docs/: run python .ci/build_docs.py (CI always does)')


class Page(HTMLParser):
    "Visible text (no script/style), link targets, element ids, the h1 and the sidebar's links of one HTML page."
    def __init__(self, html):
        super().__init__(); self.text, self.hrefs, self.ids, self.h1, self.nav = [], [], set(), '', []
        self._skip, self._h1, self._navdepth = 0, False, 0
        self.feed(html)
        self.text = ' '.join(' '.join(self.text).split())
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag in ('script', 'style'): self._skip += 1
        if tag == 'h1': self._h1 = True
        if tag == 'nav' and 'md-nav--primary' in (a.get('class') or ''): self._navdepth = 1
        elif tag == 'nav' and self._navdepth: self._navdepth += 1
        if tag in ('a', 'link', 'img', 'script') and (a.get('href') or a.get('src')):
            self.hrefs.append(a.get('href') or a.get('src'))
            if tag == 'a' and self._navdepth: self.nav.append(a['href'])
    def handle_endtag(self, tag):
        if tag in ('script', 'style'): self._skip -= 1
        if tag == 'h1': self._h1 = False
        if tag == 'nav' and self._navdepth: self._navdepth -= 1
    def handle_data(self, d):
        if self._skip: return
        self.text.append(d)
        if self._h1: self.h1 += d


def plain(md):
    "Markdown -> the words a reader sees: links to their text, no code/emphasis marks, math dropped."
    md = re.sub(r'\$\$.*?\$\$|\$[^$]*\$', ' ', md, flags=re.S)
    md = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', md)
    return ' '.join(re.sub(r'[`*_>#|]', ' ', md).split())


def words(s): return re.findall(r'[a-z0-9]+', s.lower())


MATH = re.compile(r'\\\(.*?\\\)|\\\[.*?\\\]|\$\$.*?\$\$|\$[^$]*\$', re.S)


def contains(hay, needle):
    "True if the word sequence of `needle` occurs in that of `hay` (math removed from both)."
    hay, needle = MATH.sub(' ', hay), MATH.sub(' ', needle)
    h, n = ' ' + ' '.join(words(hay)) + ' ', ' ' + ' '.join(words(needle)) + ' '
    return n in h


def test_plain_and_contains_can_fail():
    assert contains('The loss, \\(x\\) and a link.', plain('the loss, $y$ and [a link](v.html)'))
    assert not contains('The loss and a link.', 'the gain')


@pytest.fixture(scope='module')
def site():
    manifest = json.loads((SITE / 'pages.json').read_text())
    pages = {m['page']: Page((SITE / m['page']).read_text(encoding='utf-8')) for m in manifest}
    return manifest, pages


@need_site
def test_every_notebook_has_a_whole_page(site):
    manifest, pages = site
    assert sorted(m['notebook'] for m in manifest) == sorted(p.name for p in NBS)
    for m in manifest:
        cs, pg = cells(ROOT / 'nbs' / m['notebook']), pages[m['page']]
        head = src(cs[0]).strip().split('\n')
        title, desc = head[0][2:].strip(), next(l for l in head[1:] if l.strip())[2:].strip()
        assert pg.h1.strip() == title, f"{m['page']}: h1 {pg.h1!r} is not the notebook's title {title!r}"
        assert contains(pg.text, plain(desc)), f"{m['page']}: the full description is missing"
        intro = plain(src(next(c for c in cs[1:] if c['cell_type'] == 'markdown')))
        first = re.split(r'(?<!\bal)(?<!\bEq)(?<!\bSec)(?<=[a-z0-9)])\. (?=[A-Z])', intro, maxsplit=1)[0]
        assert len(words(first)) >= 5 and contains(pg.text, first), f"{m['page']}: intro missing: {first[:80]!r}"


@need_site
def test_pages_are_clean(site):
    manifest, pages = site
    for name, pg in pages.items():
        html = (SITE / name).read_text(encoding='utf-8')
        assert '#|' not in pg.text, f'{name}: a `#|` directive is shown'
        assert 'output-file:' not in pg.text and not re.search(r'---\s*description:', pg.text), f'{name}: front matter'
        assert '{target=' not in pg.text, f'{name}: raw quarto link attributes'
        for bad in ('/work/', '/root/', '/tmp/', '/home/'):
            assert bad not in html, f'{name}: an absolute path of the building machine ({bad}): ' + \
                html[max(0, html.find(bad) - 80):html.find(bad) + 80]
        assert not re.search(r'(?<![\w/])https?://(unpkg|cdn|fonts\.googleapis)', html), f'{name}: loads from a CDN'


@need_site
def test_links_resolve_and_sidebar_is_everywhere(site):
    manifest, pages = site
    order = [m['page'] for m in manifest]
    for name, pg in pages.items():
        nav = [urlsplit(h).path for h in pg.nav if not urlsplit(h).scheme]
        assert [p for p in nav if p in order] == order or set(order) <= set(nav), f'{name}: sidebar lacks pages'
        for h in pg.hrefs:
            u = urlsplit(h)
            if u.scheme or h.startswith(('#', '//', 'mailto:')): continue
            target = (SITE / name).parent / unquote(u.path) if u.path else SITE / name
            assert target.exists(), f'{name}: link {h} resolves to no file'
            if u.fragment and target.suffix == '.html' and target.name in pages:
                assert unquote(u.fragment) in pages[target.name].ids, f'{name}: link {h}: no such anchor'
        i = order.index(name)
        html = (SITE / name).read_text(encoding='utf-8')
        if i > 0: assert 'md-footer__link--prev' in html, f'{name}: no previous link'
        if i < len(order) - 1: assert 'md-footer__link--next' in html, f'{name}: no next link'
    index = (SITE / 'search' / 'search_index.js').read_text(encoding='utf-8')
    for m in manifest: assert json.dumps(m['title'])[1:-1][:20] in index, f"search index lacks {m['title']}"


@need_site
def test_math_is_typeset_offline(site):
    manifest, pages = site
    for m in manifest:
        nb = (ROOT / 'nbs' / m['notebook']).read_text(encoding='utf-8')
        html = (SITE / m['page']).read_text(encoding='utf-8')
        if re.search(r'\$[^$\n]+\$', nb): assert 'class="arithmatex"' in html, f"{m['page']}: math is not marked"
    assert (SITE / 'mathjax' / 'MathJax.js').exists() and (SITE / 'mathjax' / 'config' / 'TeX-AMS-MML_HTMLorMML-full.js').exists()


def test_no_slow_cell_runs_while_building_docs():
    "nbdev executes every cell that imports something while it builds the docs: a `#| slow` cell must not import."
    import ast
    bad = []
    for nb in NBS:
        for c in cells(nb):
            s = src(c)
            if c['cell_type'] != 'code' or not re.search(r'^#\|\s*(slow|gpu)\b', s, re.M): continue
            try: tree = ast.parse('\n'.join(l for l in s.split('\n') if not l.lstrip().startswith(('%', '!'))))
            except SyntaxError: continue
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)): bad.append(f"{nb.name} {c.get('id')}")
    assert not bad, f'slow cells with imports (move the import into its own cell): {bad}'


@need_site
def test_contents_lists_and_headings_read_as_text(site):
    "No raw TeX in a page's contents list; symbol headings keep their underscores (`__getitem__` is not bold)."
    manifest, pages = site
    for m in manifest:
        html = (SITE / m['page']).read_text(encoding='utf-8')
        for toc in re.findall(r'<nav class="md-nav md-nav--secondary".*?</nav>', html, re.S):
            assert '\\(' not in toc and '$' not in toc, f"{m['page']}: raw TeX in the contents list"
        for h in re.findall(r'<h[2-6][^>]*class="doc-sym"[^>]*>.*?</h[2-6]>', html, re.S):
            assert '<strong>' not in h, f"{m['page']}: a symbol heading lost its underscores: {h[:120]}"
    nb_dunders = [n for n in NBS if re.search(r'show_doc\([\w.]+\.__\w+__', n.read_text(encoding='utf-8'))]
    for n in nb_dunders:
        page = next(m['page'] for m in manifest if m['notebook'] == n.name)
        assert re.search(r'class="doc-sym"[^>]*>[\w.]*__\w+__', (SITE / page).read_text(encoding='utf-8')), page


@need_site
def test_outputs_and_headings_are_styled_apart(site):
    "Outputs sit in nbdev's `cell-output` blocks with their own style; only symbol headings are in the code font."
    manifest, pages = site
    css = (SITE / 'site.css').read_text()
    assert '.cell-output' in css and '.doc-sym' in css and not re.search(r'(^|\s)h3\s*\{[^}]*code-font', css)
    for m in manifest:
        has_out = any(c['cell_type'] == 'code' and c.get('outputs') and 'show_doc' not in src(c)
                      and not re.search(r'#\|\s*(hide|include:\s*false|output:\s*false)', src(c))
                      for c in cells(ROOT / 'nbs' / m['notebook']))
        html = (SITE / m['page']).read_text(encoding='utf-8')
        if has_out: assert 'class="cell-output"' in html, f"{m['page']}: outputs are not set apart from code"
        assert 'nbdev-styles.css' in html and 'site.css' in html, f"{m['page']}: a style sheet is not linked"


@need_site
def test_notebook_names_are_links(site):
    "A notebook named in the text (`08_train`) links to its page."
    manifest, pages = site
    stems = {Path(m['notebook']).stem for m in manifest}
    for m in manifest:
        html = (SITE / m['page']).read_text(encoding='utf-8')
        html = re.sub(r'<pre.*?</pre>|<a [^>]*>.*?</a>', ' ', html, flags=re.S)   # code blocks and links aside
        bare = sorted({s for s in re.findall(r'<code>(\d\d[a-z]?_\w+)</code>', html) if s in stems})
        assert not bare, f"{m['page']}: notebook names not linked: {bare}"


@need_site
def test_404_page_links_resolve_where_the_site_is_published():
    "The 404 page links absolutely (it is served at any depth): every link maps into the site under doc_baseurl."
    import configparser
    ini = configparser.ConfigParser()
    ini.read(ROOT / 'settings.ini')
    base = ini['DEFAULT']['doc_baseurl'].rstrip('/') + '/'
    pg = Page((SITE / '404.html').read_text(encoding='utf-8'))
    local = [h for h in pg.hrefs if not urlsplit(h).scheme and not h.startswith(('#', '//', 'mailto:'))]
    assert local
    for h in local:
        path = urlsplit(h).path
        assert path.startswith(base), f'404.html: {h} is not under {base}'
        assert (SITE / unquote(path[len(base):])).exists(), f'404.html: {h} resolves to no file'
