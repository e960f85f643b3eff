"""The results pipeline: README results blocks equal their rendering from the committed result files, every number of
the toy table is the bootstrap of the file's per-seed values, `mf-study`'s command line, and the toy preset's plain
flow-matching baseline."""
import json, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from meanflow_nb.report import bootstrap_ci, fmt_ci, load_result, readme_blocks, render_readme, RESULT_TABLES, results_dir
import meanflow_nb.study   # registers every study, README block and figure (the `mf-study` entry point)
import meanflow_nb.digits_study as digits
from meanflow_nb.digits_results import digits_table
import meanflow_nb.convergence as conv

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')


def test_results_dir_is_the_repository_folder():
    assert results_dir() == ROOT / 'results'


def test_readme_blocks_equal_their_rendering():
    "Every `<!-- results:NAME -->` block of the README is exactly what its renderer makes of the result files."
    blocks = readme_blocks(README)
    assert 'toy' in blocks
    for name, text in blocks.items():
        assert name in RESULT_TABLES, f'README block {name!r} has no registered renderer'
        assert text == RESULT_TABLES[name]().rstrip('\n') + '\n', f'README block {name!r} is stale: run `mf-study readme`'


def test_toy_table_numbers_are_the_files_bootstrap():
    "Independently of the renderer: the table's intervals are exactly `bootstrap_ci` of the file's per-seed columns."
    res = load_result('toy_fm_vs_mf')
    rows = [l for l in readme_blocks(README)['toy'].splitlines() if l.startswith('| ') and not l.startswith('| model')]
    got = [re.findall(r'\d[\d.e-]* \[[^\]]+\]', r) for r in rows]
    want = []
    for m, d in res['methods'].items():
        for sol in ('euler', 'heun', 'native'):
            if sol in d:
                for i, k in enumerate(d[sol]['nfe']):
                    want.append([fmt_ci(bootstrap_ci(np.array(d[sol][met])[:, i])) for met in ('swd', 'energy')])
    n = len(res['seeds'])
    assert n >= 3 and all(len(d['native' if 'native' in d else 'euler']['swd']) == n for d in res['methods'].values())
    assert f'over {n} training seeds' in readme_blocks(README)['toy']
    assert got == want


def test_toy2d_baseline_is_the_studys_choice():
    "The preset's flow-matching baseline uses the settings the study chose on its validation seed."
    from meanflow_nb.train import get_config
    res, cfg = load_result('toy_fm_vs_mf'), get_config('toy2d')
    chosen = {k: v for k, v in res['fm_settings'].items() if k not in ('method', 'baseline_fm')}
    assert res['fm_settings']['method'] == 'fm' and res['fm_settings']['norm_p'] == 0.0
    base = {**{k: getattr(cfg, k) for k in chosen}, **cfg.baseline_kwargs}
    assert base == chosen, (base, chosen)


def test_stale_readme_is_detected(tmp_path):
    p = tmp_path / 'README.md'
    block = readme_blocks(README)['toy']
    first = re.search(r'\d\.\d+ \[', block).group(0)
    p.write_text(README.replace(block, block.replace(first, '9' + first[1:], 1)))
    _, stale = render_readme(p, write=False)
    assert stale == ['toy']
    text, stale = render_readme(p, write=True)
    assert stale == ['toy'] and p.read_text() == README


def mf_study(*args):
    return subprocess.run([sys.executable, '-m', 'meanflow_nb.study', *args], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=ROOT)


def test_cli_list_check_and_errors():
    r = mf_study('list')
    assert r.returncode == 0 and re.search(r'toy-fm-vs-mf\s+~\d+ min', r.stdout), r.stdout + r.stderr
    r = mf_study('readme', '--check')
    assert r.returncode == 0 and 'match' in r.stdout, r.stdout + r.stderr
    r = mf_study('no-such-study')
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'unknown study no-such-study' in r.stderr


def test_toy2d_baseline_is_plain_flow_matching(tmp_path):
    "The preset's baseline is trained with its own settings (plain squared error), the MeanFlow run with the preset's."
    from meanflow_nb.train import get_config, train
    cfg = get_config('toy2d', steps=2, eval_samples=50, out=str(tmp_path / 'run'), model_kwargs=dict(hidden=8, depth=2))
    assert cfg.baseline_fm and cfg.baseline_kwargs['norm_p'] == 0.0 and cfg.norm_p == 0.75
    train(cfg, progress=False)
    base = json.loads((tmp_path / 'run' / 'baseline_fm' / 'config.json').read_text())
    main = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert base['method'] == 'fm' and base['baseline_fm'] is False and main['method'] == 'mf'
    for k, v in cfg.baseline_kwargs.items(): assert base[k] == v, k
    assert main['norm_p'] == 0.75


def _prose(text: str) -> str:
    "A page's text without its generated blocks, code, inline code and link targets."
    text = re.sub(r'<!-- results:([\w-]+) -->.*?<!-- /results:\1 -->', '', text, flags=re.S)
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    text = re.sub(r'`[^`\n]*`', '', text)
    return re.sub(r'\]\([^)]*\)', ']', text)


MEASURED = re.compile(r'\b\d+\.\d+\b|\b\d+(?:\.\d+)?\s?x\b|\b\d+\s?%|\b\d+ min\b|\b\d+ s\b')


def test_readme_measured_numbers_live_in_generated_blocks():
    "From the main job to the docs section, every measured-looking number (decimals, ratios, percentages, durations) is in a block."
    sec = README[README.index('## Two commands on a fresh machine'):README.index('## Docs')]
    bad = MEASURED.findall(_prose(sec))
    assert not bad, f'numbers written by hand in the README (render them from results/ instead): {bad}'


def test_hand_written_number_is_caught():
    "The check above can fail: a hand-written ratio or decimal outside a block is found."
    sec = 'MeanFlow is 1.49x faster, SWD 0.184. <!-- results:toy -->\n0.179\n<!-- /results:toy --> `p = 0.75`'
    assert MEASURED.findall(_prose(sec)) == ['1.49x', '0.184']


def test_digits_table_numbers_are_the_files_bootstrap():
    "Independently of the renderer: every FID interval of the digits block is `bootstrap_ci` of the files' per-seed values."
    files = {m: load_result(f'digits_{m}') for m in digits.DIGITS_METHODS}
    seeds = sorted(set.intersection(*(set(f['seeds']) for f in files.values())), key=int)
    assert len(seeds) >= 5
    rows = {}
    for line in digits_table().splitlines():   # the superseded 300-step table, now shown in 13_results only
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) == 3 and cells[1].isdigit(): rows[(cells[0], int(cells[1]))] = cells[2]
    want = {}
    for m, f in files.items():
        for key in f['seeds'][seeds[0]]['final']:
            sol, k = re.match(r'([a-z]+)(\d+)$', key).groups()
            label = digits.DIGITS_LABELS[m] + ({'euler': ', Euler', 'heun': ', Heun'}.get(sol, ''))
            if (label, int(k)) in rows: want[(label, int(k))] = fmt_ci(bootstrap_ci([f['seeds'][s]['final'][key] for s in seeds]))
        for key in f['seeds'][seeds[0]].get('final_matched', {}):   # iMF at the others' guidance scale
            label, k = f"iMF, omega {digits.DIGITS_IMF_MATCHED:g} (the others' guidance)", int(key[3:])
            want[(label, k)] = fmt_ci(bootstrap_ci([f['seeds'][s]['final_matched'][key] for s in seeds]))
    assert len(rows) >= 20 and set(want) == set(rows), (sorted(set(rows) ^ set(want)))
    assert rows == want


def test_digits_conv_table_numbers_are_the_files_t_intervals():
    "Independently of the renderer: every 1- and 2-NFE interval of the README's convergence block is Student's t of the files' per-seed values."
    from scipy import stats
    files = {m: load_result(f'digits_conv_{m}') for m in conv.CONV_METHODS}
    seeds = sorted(set.intersection(*(set(f['runs']) for f in files.values())), key=int)
    assert len(seeds) >= 5
    rows = {}
    for line in readme_blocks(README)['digits_conv'].splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) == 7 and cells[1].replace(',', '').isdigit(): rows[cells[0]] = cells
    label = lambda m: conv.CONV_LABELS[m] + (' (Euler)' if m == 'fm' else '')
    assert set(rows) == {label(m) for m in conv.CONV_METHODS}
    for m, f in files.items():
        for col, key in ((4, 'nfe1'), (5, 'nfe2')):
            key = key.replace('nfe', 'euler') if m == 'fm' else key
            v = np.array([f['runs'][s]['final'][key] for s in seeds])
            lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
            want = fmt_ci(dict(mean=v.mean(), lo=lo, hi=hi))
            assert rows[label(m)][col].startswith(want + ' '), (m, key, rows[label(m)][col], want)


def test_toy_long_quick_run_feeds_its_table(tmp_path):
    "`mf-study toy-long --quick` end to end: the recipe on the validation seed, 2 seeds x 2 methods, flow matching scored "
    "at MeanFlow's marks, its matched-compute checkpoint and its last; the summary and the README table read the files."
    from meanflow_nb.toy_long import study_toy_long, toy_long_summary, toy_long_table
    r = study_toy_long(tmp_path / 'runs', quick=True)
    folder = tmp_path / 'runs' / 'toy_long' / 'quick_results'
    comp = json.loads((folder / 'toy_long_compute.json').read_text())['methods']
    for s in (10, 11):
        assert sorted(map(int, r['runs'][('mf', s)]['quality'])) == [4, 8]
        fm = sorted(map(int, r['runs'][('fm', s)]['quality']))
        # 8 (MeanFlow's last mark) x the measured ratios, rounded to the 4-step grid, lies inside the 16-step run
        match = {min(range(4, 17, 4), key=lambda g: abs(g - 8 * comp['mf'][k] / comp['fm'][k]))
                 for k in ('flops_per_step', 'cpu_s_per_step')}
        assert fm == sorted({4, 8, 16} | match)
    S = toy_long_summary(folder)
    assert S['seeds'] == ['10', '11'] and (8, 'flops-matched') in S['points']
    assert 'MeanFlow 1 step' in toy_long_table(folder)
