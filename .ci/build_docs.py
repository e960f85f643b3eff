"""Offline docs build, for machines without quarto: nbdev's processors, then nbconvert to HTML in _docs/.
Fails if any notebook does not render to a page. On a machine with quarto, `nbdev_docs` builds the real site."""
import json, shutil, sys, os
from pathlib import Path
from nbdev.config import get_config
from nbdev.serve import proc_nbs
from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar

cfg = get_config()
nbs, out = cfg.nbs_path, cfg.config_path / '_docs'
refresh_quarto_yml()
nbdev_sidebar.__wrapped__(path=nbs)
proc_nbs(nbs, force=True, n_workers=0)
proc = cfg.config_path / '_proc'
shutil.rmtree(out, ignore_errors=True); out.mkdir()

from nbconvert import HTMLExporter
import nbformat
exp = HTMLExporter(template_name='lab')
src = sorted(p for p in nbs.rglob('*.ipynb') if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts)
failed = []
for p in src:
    q = proc / p.relative_to(nbs.parent) if (proc / p.relative_to(nbs.parent)).exists() else proc / p.relative_to(nbs)
    try:
        nb = json.loads(q.read_text(encoding='utf-8'))
        for c in nb['cells']: c.get('metadata', {}).pop('execution', None)  # quarto's float timing field breaks nbformat
        body, _ = exp.from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4))
        page = out / (p.stem + '.html')
        page.write_text(body, encoding='utf-8')
        if len(body) < 1000: raise ValueError('page is empty')
        print(f'rendered {p.name} -> {page.relative_to(cfg.config_path)} ({len(body) // 1024} KiB)')
    except Exception as ex:
        failed.append(f'{p.name}: {type(ex).__name__}: {ex}')
if failed:
    print('FAILED to render:\n  ' + '\n  '.join(failed)); sys.exit(1)
print(f'{len(src)} notebooks rendered to {out}')
