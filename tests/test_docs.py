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
