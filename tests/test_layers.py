"""The package's layers: each module imports only modules below it (checked over the sources with `ast`, including
imports inside functions), and each module imports on its own in a fresh interpreter (no import cycle hides behind
import order)."""
import ast, subprocess, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parent.parent / 'meanflow_nb'
# lower number = lower layer; a module may import only modules of a strictly lower layer
LAYERS = {
    'core': 0,
    'report': 1, 'toy': 1, 'flow_matching': 1, 'schedules': 1, 'dist': 1,   # report: statistics, result files, README blocks
    'blocks': 2, 'latents': 2,   # latents: the SD-VAE side (normalisation, shard format, LatentDataset, decoding)
    'models': 3, 'data': 3,      # data: datasets, image folders, encoding a folder into latents (it reads images)
    'loss': 4,
    'kim': 5, 'imf': 5,      # the methods: never the trainer
    'config': 6,             # TrainConfig, presets, validation
    'methods': 7, 'plan': 7, # the method table; the memory and cost model
    'batches': 7,            # step-indexed batches of a run's data
    'checkpoint': 8,         # checkpoint files, the run folder, loading a run into a model
    'pretrained': 9, 'fid': 9,
    'shards': 9,             # sample folders: shards, meta.json, COMPLETE, resume, gathering
    'eval': 10,              # what a trained run is worth; eval resolves pretrained checkpoints; never the trainer
    'train': 11,             # the step and the loop; calls eval at the end of a run
    'sizing': 11.5, 'scaling': 11.5,  # mf-bench plan (memory, FLOPs, GPU-hours); the paper-scale options timed
    'bench': 12,
    'toy_study': 13, 'digits_study': 13,    # the toy and the 300-step digits studies: they run the trainer
    'convergence': 14,       # the digits convergence study's runs
    'digits_results': 14,    # the 300-step digits files read into intervals, its block and figures
    'conv_results': 15,      # its result files read into intervals, the README block, the figures
    'toy_long': 16,          # the long toy
    'study': 17,             # `mf-study`: every study, in order; the measurements of the tool itself
    'cli': 18,               # every console script
}
MODULES = sorted(p.stem for p in PKG.glob('*.py') if not p.stem.startswith('_'))


def _is_main_block(n) -> bool:
    t = getattr(n, 'test', None) if isinstance(n, ast.If) else None
    for c in ast.walk(t) if t is not None else ():
        if isinstance(c, ast.Compare) and getattr(c.left, 'id', '') == '__name__' \
                and any(getattr(x, 'value', None) == '__main__' for x in c.comparators):
            return True
    return False


def imported(mod: str) -> set[str]:
    "Package modules that `mod`'s source imports anywhere (top level or inside functions)."
    out = set()
    tree = ast.parse((PKG / f'{mod}.py').read_text())
    for n in ast.walk(tree):
        if _is_main_block(n):               # `if __name__ == '__main__'`: an entry shim (python -m), not a dependency
            n.body, n.orelse = [], []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            name = n.module or ''
            if n.level == 1 or name == 'meanflow_nb' or name.startswith('meanflow_nb.'):
                name = name.removeprefix('meanflow_nb').lstrip('.')
                if name: out.add(name.split('.')[0])
                else: out.update(a.name for a in n.names)          # from . import dist / from meanflow_nb import data
        elif isinstance(n, ast.Import):
            out.update(a.name.split('.')[1] for a in n.names if a.name.startswith('meanflow_nb.'))
        elif isinstance(n, ast.Call) and getattr(n.func, 'attr', '') == 'import_module' and n.args \
                and isinstance(n.args[0], ast.Constant) and str(n.args[0].value).startswith('meanflow_nb.'):
            out.add(n.args[0].value.split('.')[1])
    return out & set(MODULES)


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(LAYERS), f'give new modules a layer: {sorted(set(MODULES) - set(LAYERS))}'


@pytest.mark.parametrize('mod', MODULES)
def test_imports_go_down(mod):
    up = sorted(d for d in imported(mod) if d != mod and LAYERS[d] >= LAYERS[mod])
    assert not up, f'{mod} (layer {LAYERS[mod]}) imports {[(d, LAYERS[d]) for d in up]}'


def test_named_edges():
    ("The issue's edges, stated directly: the methods never import the trainer, models never imports bench; eval, "
     "checkpoint, methods and pretrained never import train.")
    for m in ('loss', 'kim', 'imf'): assert not imported(m) & {'train', 'study', 'bench', 'eval'}, m
    assert 'bench' not in imported('models')
    for m in ('eval', 'checkpoint', 'methods', 'pretrained'):  # what a run is worth is judged below the trainer
        assert 'train' not in imported(m), m


def test_checker_sees_function_level_imports(tmp_path, monkeypatch):
    "The checker itself can fail: an import hidden inside a function is found."
    (tmp_path / 'kim.py').write_text('def f():\n    from meanflow_nb.train import get_config\n    from . import study\n')
    monkeypatch.setattr(sys.modules[__name__], 'PKG', tmp_path)
    assert imported('kim') == {'train', 'study'}


def test_each_module_imports_alone():
    "Every module imports first in a fresh interpreter (all in parallel, one process each)."
    procs = {m: subprocess.Popen([sys.executable, '-c', f'import meanflow_nb.{m}'], stderr=subprocess.PIPE, text=True)
             for m in MODULES}
    bad = {m: p.communicate(timeout=300)[1].strip().splitlines()[-1:] for m, p in procs.items() if p.wait(timeout=300)}
    assert not bad, bad
