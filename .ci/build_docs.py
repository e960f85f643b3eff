"""Offline docs build, for machines without quarto: the notebooks as a navigable site in `_docs/`.

`nbdev_docs` builds the real (quarto) site wherever quarto is installed; quarto cannot be installed here, so this
script builds the same pages with MkDocs and the Material theme (a maintained static-site generator whose sidebar,
previous/next footer and offline search are what a reader of an nbdev site expects). The pipeline:

1. nbdev's own processors (`proc_nbs`, as `nbdev_docs` runs them): front matter from the first cell, `show_doc`
   for every export, `#| hide`/`exporti` cells dropped, symbols linked.
2. Each processed notebook becomes one Markdown page, with quarto's cell options applied as quarto applies them
   (`echo: false` hides the code, `output: false` the output, `include: false` both, `output: asis` inserts
   Markdown as is), every `show_doc` gets nbdev's docments parameter table, doc-host URLs and `.ipynb` links
   point at the local pages, and figures are written beside the page.
3. MkDocs builds the site: the sidebar in `sidebar.yml`'s order, previous/next links, search that also works from
   `file://` (Material's offline plugin), math typeset by the MathJax copy that the `jupyter-server-mathjax`
   package ships (no network).

Open `_docs/index.html`. Fails if any notebook does not make a page."""
import base64, inspect, json, re, shutil, sys, time, importlib, importlib.util
from pathlib import Path

import yaml
from nbdev.config import get_config
from nbdev.serve import proc_nbs
from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar

t0 = time.time()
cfg = get_config()
root, nbs = cfg.config_path, cfg.nbs_path
out, proc, src = root / '_docs', root / '_proc', root / '_proc' / '_mkdocs'
host = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/"

refresh_quarto_yml()
nbdev_sidebar.__wrapped__(path=nbs)
if '--reuse-proc' not in sys.argv: proc_nbs(nbs, force=True, n_workers=0)  # the flag is for editing this script
shutil.rmtree(src, ignore_errors=True); (src / 'figs').mkdir(parents=True)
if (nbs / 'images').exists(): shutil.copytree(nbs / 'images', src / 'images')

order = [p for p in yaml.safe_load((nbs / 'sidebar.yml').read_text())['website']['sidebar']['contents']
         if isinstance(p, str)]
nb_files = sorted(p.name for p in nbs.glob('*.ipynb') if not p.name.startswith('_'))
order += [p for p in nb_files if p not in order]  # a notebook missing from the sidebar still gets a page


def front(nb):
    "Front matter of a processed notebook (its first raw cell) as a dict."
    c = nb['cells'][0]
    s = ''.join(c['source'])
    return yaml.safe_load(s.strip().strip('-')) if c['cell_type'] == 'raw' and s.startswith('---') else {}


page_of, meta = {}, {}  # notebook name -> page name ('loss.md'), and its front matter
for name in order:
    q = proc / name
    fm = front(json.loads(q.read_text(encoding='utf-8')))
    page_of[name] = Path(fm.get('output-file', Path(name).stem + '.html')).with_suffix('.md').name
    meta[name] = fm
url2page = {Path(v).with_suffix('.html').name: v for v in page_of.values()}
anchors = {}  # page -> the symbols its show_doc cells document (nbdev links every known symbol, shown or not)
for name in order:
    for c in json.loads((proc / name).read_text(encoding='utf-8'))['cells']:
        for o in c.get('outputs', []):
            md = ''.join(o.get('data', {}).get('text/markdown', []))
            if 'show_doc' in ''.join(c['source']):
                anchors.setdefault(page_of[name], set()).update(h.lower() for h in re.findall(r'^#+ (\S+)\s*$', md, re.M))


def local_links(md):
    "Doc-host URLs and `.ipynb` links -> the local pages (MkDocs resolves `x.md` to `x.html`)."
    def host_sub(m):
        page, anchor = m.group(1), m.group(2) or ''
        if page not in url2page: return m.group(0)
        anchor = anchor.lower() if anchor[1:].lower() in anchors.get(url2page[page], ()) else ''
        return f'({url2page[page]}{anchor})'
    md = re.sub(r'\(' + re.escape(host) + r'([\w.-]+\.html)(#[\w.-]+)?\)', host_sub, md)
    return re.sub(r'\]\(([\w.-]+\.ipynb)(#[^)]*)?\)',
                  lambda m: f']({page_of.get(m.group(1), m.group(1))}{m.group(2) or ""})', md)


TEX = {r'\omega': 'ω', r'\beta': 'β', r'\theta': 'θ', r'\kappa': 'κ', r'\lambda': 'λ', r'\gamma': 'γ',
       r'\sigma': 'σ', r'\mu': 'μ', r'\epsilon': 'ε', r'\Delta': 'Δ', r'\delta': 'δ', r'\tau': 'τ', r'\max': 'max',
       r'\min': 'min', r'\le': '≤', r'\ge': '≥', r'\to': '→', r'\approx': '≈', r'\cdot': '·', r'\,': ' '}


def plain_tex(s):
    "A heading's math as plain text for the contents list (`$[1, \\omega_{max}]$` -> `[1, ω_max]`)."
    def one(m):
        t = m.group(1)
        for k, v in TEX.items(): t = t.replace(k, v)
        t = re.sub(r'\\(?:mathrm|text|mathbf|operatorname)\{([^}]*)\}', r'\1', t)
        t = re.sub(r'_\{([^}]*)\}', r'_\1', t).replace('{', '').replace('}', '')
        return re.sub(r'\\([A-Za-z]+)', r'\1', t)
    return re.sub(r'\$([^$]+)\$', one, s).replace('`', '')


def link_notebooks(line):
    "`` `08_train` `` -> a link to its page, where such a notebook exists and the name is not a link already."
    def sub(m):
        nb = m.group(1) + '.ipynb'
        return f'[`{m.group(1)}`]({page_of[nb]})' if nb in page_of else m.group(0)
    return re.sub(r'(?<!\[)`(\d\d[a-z]?_[a-z0-9_]+|index)`(?!\]|\()', sub, line)


def md_fixes(md):
    ("Markdown as Jupyter renders it -> as Python-Markdown needs it: a blank line before a list; headings with math "
     "get a plain contents-list label; notebook names become links.")
    lines, res, fence = md.split('\n'), [], False
    for i, l in enumerate(lines):
        if l.lstrip().startswith('```'): fence = not fence
        if not fence and re.match(r'#{1,6} .*\$', l) and '{' not in l.split('$')[-1]:
            l = f'{l} {{data-toc-label="{plain_tex(l.lstrip("#").strip())}"}}'
        elif not fence and not l.startswith('#'):
            l = link_notebooks(l)
        if (not fence and res and res[-1].strip() and re.match(r'(- |\* |\d+\. )', l)
                and not re.match(r'\s*(- |\* |\d+\. )', res[-1]) and not res[-1].startswith(('  ', '|'))):
            res.append('')
        res.append(l)
    return '\n'.join(res)


def directives(source):
    "quarto/nbdev cell options (`#| key: value`) and the source without them."
    opts, keep = {}, []
    for l in source.split('\n'):
        m = re.match(r'#\|\s*([\w-]+)\s*:?\s*(.*)', l)
        if m: opts[m.group(1)] = m.group(2).strip().lower() or 'true'
        else: keep.append(l)
    return opts, '\n'.join(keep).strip('\n')


ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
def text(o): return ''.join(o) if isinstance(o, list) else o
def fence(s, lang=''): return f'```{lang}\n{ANSI.sub("", s).rstrip()}\n```'


def docments_table(expr, mods):
    "nbdev's docments parameter table for the object `show_doc(expr)` names, or ''."
    from fastcore.docments import DocmentTbl
    for mod in mods:
        try: obj = eval(expr, vars(mod))
        except Exception: continue
        try: t = DocmentTbl(obj)
        except Exception: return ''
        if not t.has_docment: return ''
        # DocmentTbl's own rows leave the `|` of `Tensor | None` unescaped, which splits the column
        cell = lambda o: ('' if o is inspect._empty else getattr(o, '__name__', str(o))).replace('|', '\\|')
        row = lambda cs: '| ' + ' | '.join(cs) + ' |'
        lines = [row(t._hdr_list), row(['-' * len(h) for h in t._hdr_list])]
        lines += [row([cell(c) for c in r]) for r in t._row_list]
        if t.has_return:
            lines.append(row(['**Returns**'] + [f'**{v}**' if v else '' for v in (cell(t.dm['return'][c]) for c in t._columns)]))
        return '\n'.join(lines)
    return ''


def show_doc_md(md, source, mods):
    "nbdev's show_doc Markdown made plain (quarto's `{target=...}` link attributes) plus its parameter table."
    md = re.sub(r'\[source\]\(([^)]+)\)\{[^}]*\}', r'<a class="srclink" href="\1">source</a>', md)
    md = re.sub(r'```python\n\n', '```python\n', md).replace('\n\n\n```', '\n```')
    # the anchor nbdev links to (`trainconfig.from_preset`), which Python-Markdown's slugs would drop the dot from
    # underscores escaped (`__getitem__` is not bold); the class styles symbol headings apart from prose headings
    esc = lambda t: t.replace('_', chr(92) + '_')
    md = re.sub(r'^(#+) (\S+)\s*$', lambda m: f"{m.group(1)} {esc(m.group(2))} {{#{esc(m.group(2).lower())} .doc-sym}}",
                md, flags=re.M)
    m = re.search(r'show_doc\((.+?)(?:,\s*\w+\s*=.*)?\)\s*$', source.strip())
    tbl = docments_table(m.group(1), mods) if m else ''
    return md_fixes(md.rstrip()) + ('\n\n' + tbl if tbl else '')


def cell_md(c, stem, k, mods):
    "One processed cell -> Markdown."
    if c['cell_type'] == 'markdown': return md_fixes(local_links(text(c['source'])))
    if c['cell_type'] != 'code': return ''
    opts, code = directives(text(c['source']))
    if opts.get('include') == 'false' or {'hide', 'exporti', 'export'} & set(opts): return ''
    parts = [] if opts.get('echo') == 'false' or not code.strip() else [fence(code, 'python')]
    outs = []
    if opts.get('output') != 'false':
        for j, o in enumerate(c.get('outputs', [])):
            if o['output_type'] == 'stream': outs.append(fence(text(o['text']), 'text'))
            elif o['output_type'] == 'error': outs.append(fence('\n'.join(o.get('traceback', [])), 'text'))
            else:
                d = o.get('data', {})
                if 'image/png' in d:
                    f = f'figs/{stem}_{k}_{j}.png'
                    (src / f).write_bytes(base64.b64decode(text(d['image/png'])))
                    outs.append(f'![]({f})')
                elif 'text/markdown' in d:
                    md = text(d['text/markdown'])
                    if 'show_doc' in code: parts.append(local_links(show_doc_md(md, code, mods)))  # a page part
                    else: outs.append(md_fixes(local_links(md)))
                elif 'text/html' in d: outs.append('<div class="output-html" markdown="0">\n'
                                                   + text(d['text/html']) + '\n</div>')
                elif 'text/plain' in d: outs.append(fence(text(d['text/plain']), 'text'))
    if outs:  # what a cell printed or drew, set apart from its code (nbdev's cell-output style)
        parts.append('<div class="cell-output" markdown="1">\n\n' + '\n\n'.join(outs) + '\n\n</div>')
    return '\n\n'.join(parts)


def modules(name):
    "The modules whose names a notebook's show_doc calls can use: its own default_exp, then the whole package."
    nb = json.loads((nbs / name).read_text(encoding='utf-8'))
    exp = [m.group(1) for c in nb['cells'] if c['cell_type'] == 'code'
           for m in [re.search(r'#\|\s*default_exp\s+(\S+)', text(c['source']))] if m]
    mods = []
    for m in exp + [p.stem for p in sorted((root / cfg.lib_name).glob('[a-z]*.py'))]:
        try: mods.append(importlib.import_module(f'{cfg.lib_name}.{m}'))
        except Exception: pass
    return mods


failed, manifest = [], []
for name in order:
    try:
        nb = json.loads((proc / name).read_text(encoding='utf-8'))
        fm, stem, mods = meta[name], Path(page_of[name]).stem, modules(name)
        title, desc = fm.get('title', stem), fm.get('description', '')
        head = f'---\ntitle: {json.dumps(title)}\n---\n\n# {title}\n\n' + (
            f'<p class="page-description" markdown="span">{link_notebooks(desc)}</p>\n\n' if desc else '')
        body = [cell_md(c, stem, k, mods) for k, c in enumerate(nb['cells'][1 if fm else 0:])]
        body = [b for b in body if b.strip() and 'THIS FILE WAS AUTOGENERATED' not in b]
        page = head + local_links('\n\n'.join(body)) + '\n'
        # defaults computed at import show the building machine's install path (DIGITS_CLASSIFIER_PATH): show it
        # relative to the package, as it is on every machine
        page = page.replace(str(root / cfg.lib_name) + '/', cfg.lib_name + '/')
        (src / page_of[name]).write_text(page, encoding='utf-8')
        manifest.append({'notebook': name, 'page': Path(page_of[name]).with_suffix('.html').name, 'title': title,
                         'description': desc})
    except Exception as ex:
        failed.append(f'{name}: {type(ex).__name__}: {ex}')
if failed:
    print('FAILED to render:\n  ' + '\n  '.join(failed)); sys.exit(1)

# MathJax 2.7 from the jupyter-server-mathjax package (its combined TeX + HTML-CSS configuration)
mj = Path(importlib.util.find_spec('jupyter_server_mathjax').origin).parent / 'static'  # found, not imported (slow)
(src / 'mathjax').mkdir()
for part in ['MathJax.js', 'config', 'extensions', 'jax', 'fonts']:  # not localization: English is built in
    (shutil.copytree if (mj / part).is_dir() else shutil.copy)(mj / part, src / 'mathjax' / part)
(src / 'mathjax-config.js').write_text("""window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]], processEscapes: false,
            processClass: "arithmatex", ignoreClass: ".*"},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},  // the fonts shipped
  messageStyle: "none", showMathMenu: false};
""")
shutil.copy(Path(__file__).parent / 'vendor' / 'iframe-worker-shim.js', src / 'iframe-worker-shim.js')
shutil.copy(nbs / 'styles.css', src / 'nbdev-styles.css') if (nbs / 'styles.css').exists() else None
(src / 'site.css').write_text("""
.page-description { font-size: 1.15em; color: var(--md-default-fg-color--light); margin-top: -0.6em; }
a.srclink { float: right; font-size: smaller; }
.md-typeset .doc-sym { font-family: var(--md-code-font-family); }
.md-typeset .cell-output { margin: -0.6em 0 1em 0.8rem; border-left: 2px solid lightsalmon; padding-left: 0.2rem; }
.md-typeset .cell-output pre, .md-typeset .cell-output .highlight, .md-typeset .cell-output code { background: none; }
.md-typeset .cell-output pre { margin: 0; }
.md-typeset .output-html, .md-typeset div.arithmatex { overflow-x: auto; }
""")

mk = {
    'site_name': cfg.title, 'site_description': cfg.description, 'site_url': host,
    'repo_url': cfg.git_url, 'docs_dir': str(src), 'site_dir': str(out), 'use_directory_urls': False,
    'strict': False,
    'theme': {'name': 'material', 'font': False,
              'features': ['navigation.footer', 'navigation.top', 'search.highlight', 'content.code.copy',
                           'toc.follow'],
              'palette': {'primary': 'indigo'}},
    'nav': [{meta[n].get('title', Path(n).stem): page_of[n]} for n in order],
    'plugins': ['search', 'offline'],
    'markdown_extensions': ['tables', 'attr_list', 'md_in_html', 'toc', 'admonition', 'pymdownx.superfences',
                            {'pymdownx.arithmatex': {'generic': True}}, {'pymdownx.highlight': {}}],
    'extra_javascript': ['mathjax-config.js', 'mathjax/MathJax.js'],
    'extra_css': ['nbdev-styles.css', 'site.css'] if (nbs / 'styles.css').exists() else ['site.css'],
    'extra': {'polyfills': ['iframe-worker-shim.js']},  # the offline plugin would fetch it from a CDN
}
(src.parent / 'mkdocs.yml').write_text(yaml.safe_dump(mk, sort_keys=False))
from mkdocs.commands.build import build
from mkdocs.config import load_config
import logging; logging.getLogger('mkdocs').setLevel(logging.ERROR)
shutil.rmtree(out, ignore_errors=True)
build(load_config(str(src.parent / 'mkdocs.yml')))
pages = sorted(out.glob('*.html'))
(out / 'pages.json').write_text(json.dumps(manifest, indent=1))  # for tests/test_docs.py
missing = [p for p in page_of.values() if not (out / Path(p).with_suffix('.html').name).exists()]
if missing: print(f'FAILED: no page for {missing}'); sys.exit(1)
print(f'{len(order)} notebooks -> {len(pages)} pages in {out.relative_to(root)}/ ({time.time() - t0:.0f} s); '
      f'open {out.relative_to(root)}/index.html')
