"""The package reads one statement per line, in lines of at most 120 characters (checked on the exported modules).

nbdev writes two lines of its own into each module, the docstring from the notebook's description and `__all__`;
those are not ours to wrap. `python tools/format_exports.py` fixes most of what this test finds, in the notebooks."""
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parent.parent / 'meanflow_nb'
MODULES = sorted(p for p in PKG.glob('*.py') if not p.stem.startswith('_'))
WIDTH = 120


def generated_lines(tree: ast.Module) -> set[int]:
    "Lines nbdev writes: the module docstring and the `__all__` list."
    out = set()
    for n in tree.body:
        is_doc = n is tree.body[0] and isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
        is_all = isinstance(n, ast.Assign) and any(getattr(t, 'id', '') == '__all__' for t in n.targets)
        if is_doc or is_all:
            out.update(range(n.lineno, n.end_lineno + 1))
    return out


def shared_lines(tree: ast.AST) -> list[int]:
    "Lines on which two statements start (`a; b`, or `if x: y` where the body starts on the header's line)."
    seen, dup = set(), []
    for n in ast.walk(tree):
        if isinstance(n, ast.stmt):
            (dup.append if n.lineno in seen else seen.add)(n.lineno)
    return sorted(dup)


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_one_statement_per_line(path):
    dup = shared_lines(ast.parse(path.read_text()))
    assert not dup, f'{path.name}: two statements on line(s) {dup[:10]}'


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_lines_within_width(path):
    src = path.read_text()
    skip = generated_lines(ast.parse(src))
    long = [i for i, l in enumerate(src.split('\n'), 1) if len(l) > WIDTH and i not in skip]
    assert not long, f'{path.name}: lines over {WIDTH} characters: {long[:10]}'


def test_checker_can_fail():
    "Both checks find what they look for."
    tree = ast.parse('import os\nx = 1; y = 2\nif x: y = 3\nfor i in []:\n    pass\n')
    assert shared_lines(tree) == [2, 3]
    tree = ast.parse('"""doc"""\n__all__ = [\n  "a"]\nx = 1\n')
    assert generated_lines(tree) == {1, 2, 3}
