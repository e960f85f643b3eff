"""One statement per line in the exported cells of every notebook.

Run from the repository root: `python tools/format_exports.py [nbs/NAME.ipynb ...]`, then `nbdev_export`.
Statements joined with `;` go on lines of their own, and a compound statement written on one line (`if x: y`,
`try: import fcntl`, `def f(x): return x`) gets an indented body (libcst rewrites only those nodes). A line over 120
characters whose code fits gets its comment on the line above; the statements still too long are wrapped by yapf,
and only those. Everything else keeps its layout. `--check` lists what would change and exits 1 if anything would."""
import io, json, re, sys, tokenize
from pathlib import Path
from yapf.yapflib.yapf_api import FormatCode
import libcst as cst


def _lines(stmts, last_ws=None, leading=()):
    "One `SimpleStatementLine` per small statement; `leading` comments go above the first, a trailing comment after the last."
    out = []
    for i, s in enumerate(stmts):
        s = s.with_changes(semicolon=cst.MaybeSentinel.DEFAULT)
        kw = {}
        if i == 0 and leading: kw['leading_lines'] = leading
        if i == len(stmts) - 1 and last_ws is not None: kw['trailing_whitespace'] = last_ws
        out.append(cst.SimpleStatementLine(body=[s], **kw))
    return out


class OnePerLine(cst.CSTTransformer):
    def leave_SimpleStatementLine(self, node, updated):
        if len(updated.body) < 2: return updated
        return cst.FlattenSentinel(_lines(updated.body, updated.trailing_whitespace, updated.leading_lines))

    def _block(self, updated):
        body = updated.body
        if not isinstance(body, cst.SimpleStatementSuite): return updated
        block = cst.IndentedBlock(body=_lines(body.body, body.trailing_whitespace))
        extra = {}
        if hasattr(updated, 'whitespace_before_colon'): extra['whitespace_before_colon'] = cst.SimpleWhitespace('')
        return updated.with_changes(body=block, **extra)

    def leave_If(self, node, updated): return self._block(updated)
    def leave_Else(self, node, updated): return self._block(updated)
    def leave_For(self, node, updated): return self._block(updated)
    def leave_While(self, node, updated): return self._block(updated)
    def leave_With(self, node, updated): return self._block(updated)
    def leave_Try(self, node, updated): return self._block(updated)
    def leave_ExceptHandler(self, node, updated): return self._block(updated)
    def leave_Finally(self, node, updated): return self._block(updated)
    def leave_FunctionDef(self, node, updated): return self._block(updated)
    def leave_ClassDef(self, node, updated): return self._block(updated)


def exported(src: str) -> bool:
    heads = [l.strip().replace(' ', '') for l in src.splitlines() if l.strip().startswith('#|')]
    return any(h.startswith('#|export') for h in heads)


WIDTH = 120


def _comment_above(src: str) -> str:
    "A line over `WIDTH` whose code fits gets its trailing comment on a line of its own above it, at the same indent."
    out = []
    toks = {}
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.COMMENT: toks[t.start[0]] = t.start[1]
    for i, line in enumerate(src.splitlines(keepends=True), 1):
        col = toks.get(i)
        code = line[:col].rstrip() if col is not None else None
        if len(line.rstrip('\n')) > WIDTH and col is not None and code and len(code) <= WIDTH:
            indent = line[:len(line) - len(line.lstrip())]
            out += [indent + line[col:].rstrip('\n') + '\n', code + ('\n' if line.endswith('\n') else '')]
        else:
            out.append(line)
    return ''.join(out)


STYLE = ('{based_on_style: pep8, column_limit: %d, split_before_named_assigns: false, coalesce_brackets: true, '
         'split_before_first_argument: false, split_all_comma_separated_values: false, '
         'each_dict_entry_on_separate_line: false, allow_split_before_dict_value: false}' % WIDTH)


def _wrap_long(src: str) -> str:
    "yapf (continuation lines aligned with the opening bracket), only on the statements with a line over `WIDTH`."
    long = [(i, i) for i, l in enumerate(src.splitlines(), 1) if len(l) > WIDTH]
    if not long: return src
    return FormatCode(src, style_config=STYLE, lines=long)[0]


def _cut(body: str, fstring: bool, room: int) -> int:
    "Index of the last space in `body[:room]` outside f-string braces (0: none)."
    depth, best, i = 0, 0, 0
    while i < min(len(body), room):
        ch = body[i]
        if fstring and body[i:i + 2] in ('{{', '}}'):
            i += 2
            continue
        if fstring and ch == '{':
            depth += 1
        elif fstring and ch == '}':
            depth -= 1
        elif ch == ' ' and depth == 0 and i > 10:
            best = i + 1
        i += 1
    return best


def _split_strings(src: str) -> str:
    "A one-line string literal on a line over `WIDTH` becomes adjacent literals on lines of their own (same value)."
    for _ in range(50):
        lines = src.splitlines(keepends=True)
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
        done, depth = False, 0
        for k, t in enumerate(toks):
            if t.type == tokenize.OP and t.string in '([{':
                depth += 1
            elif t.type == tokenize.OP and t.string in ')]}':
                depth -= 1
            (r, c), (r2, c2) = t.start, t.end
            if t.type != tokenize.STRING or r != r2 or len(lines[r - 1].rstrip('\n')) <= WIDTH: continue
            m = re.match(r"^([rRbBfFuU]*)('|\")", t.string)
            if not m or t.string.startswith(m.group(0) * 3): continue
            pre, q = m.group(1), m.group(2)
            body = t.string[len(pre) + 1:-1]
            cut = _cut(body, 'f' in pre.lower(), WIDTH - c - len(pre) - 2)
            if not cut: continue
            alone = depth == 0                                              # not inside brackets: parenthesise
            a, b = f'{pre}{q}{body[:cut]}{q}', f'{pre}{q}{body[cut:]}{q}'
            line = lines[r - 1]
            if alone:
                new = f'{line[:c]}({a}\n{" " * (c + 1)}{b}){line[c2:]}'
            else:
                new = f'{line[:c]}{a}\n{" " * c}{b}{line[c2:]}'
            lines[r - 1] = new
            src = ''.join(lines)
            done = True
            break
        if not done: return src
    return src


def fix(src: str) -> str:
    src = cst.parse_module(src).visit(OnePerLine()).code
    return _split_strings(_wrap_long(_comment_above(src)))


def format_nb(p: Path, write: bool = True) -> int:
    nb = json.loads(p.read_text())
    n = 0
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        if not exported(src): continue
        new = fix(src)
        if new != src:
            c['source'] = new.splitlines(keepends=True)
            n += 1
    if n and write: p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return n


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if a != '--check']
    check = '--check' in sys.argv
    paths = [Path(a) for a in args] or sorted(Path('nbs').glob('*.ipynb'))
    changed = {p.name: k for p in paths if (k := format_nb(p, write=not check))}
    print(changed or 'nothing to change')
    sys.exit(1 if check and changed else 0)
