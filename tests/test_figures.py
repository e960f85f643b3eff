"""Every figure the package draws labels its axes: x and y labels on every plot axis, a title (or a suptitle)."""
import json
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import pytest
import torch

from meanflow_nb.core import scatter2d, plot_field, show_images
from meanflow_nb.train import get_config, build_model, plot_log, evaluate_toy, save_sample_grid


def unlabelled(fig) -> list:
    "Descriptions of the axes of `fig` that miss a label: plot axes need x, y and a title; image axes (axis off) a title."
    sup = fig._suptitle is not None and fig._suptitle.get_text()
    bad = []
    for i, ax in enumerate(fig.axes):
        if ax.get_label() == '<colorbar>': continue
        if ax.axison and not (ax.get_xlabel() and ax.get_ylabel()): bad.append(f'axis {i}: x/y label missing')
        if not (ax.get_title() or sup): bad.append(f'axis {i}: no title and no suptitle')
    return bad


@pytest.fixture
def saved(monkeypatch):
    "Figures the package saves (it draws on `matplotlib.figure.Figure` and saves, without pyplot)."
    figs = []
    orig = Figure.savefig
    def keep(self, *a, **k): figs.append(self); return orig(self, *a, **k)
    monkeypatch.setattr(Figure, 'savefig', keep)
    return figs


def test_unlabelled_detects_a_bare_axis():
    "The check can fail: a plain plot with no labels is reported, the same plot with labels is not."
    fig = Figure(); ax = fig.subplots(); ax.plot([0, 1], [1, 0])
    assert len(unlabelled(fig)) == 2
    ax.set_xlabel('a'); ax.set_ylabel('b'); ax.set_title('c')
    assert unlabelled(fig) == []


def test_core_helpers_label_their_axes():
    fig, axs = plt.subplots(1, 3)
    scatter2d(torch.randn(50, 2), axs[0], 'points')
    plot_field(lambda p: -p, axs[1], n=5, title='a field')
    show_images(torch.rand(4, 1, 8, 8) * 2 - 1, nrow=2, ax=axs[2], title='images')
    assert unlabelled(fig) == []
    plt.close(fig)


def test_plot_log_labels_its_axes(tmp_path):
    rows = [dict(step=s, loss=1 - 0.01 * s, loss_u=2.0 + 0.1 * s, loss_v=3.0 - 0.1 * s) for s in range(1, 6)]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    fig = plot_log(tmp_path, tmp_path / 'loss.png')
    assert unlabelled(fig) == [] and (tmp_path / 'loss.png').exists()
    raw = [l for l in fig.axes[0].get_lines()]                        # the raw errors, as logged
    assert [list(l.get_ydata()) for l in raw] == [[r['loss_u'] for r in rows], [r['loss_v'] for r in rows]]


def test_run_figures_label_their_axes(tmp_path, saved):
    "The figures a run saves: `samples.png` of a 2-D run and the sample grid of an image run."
    cfg = get_config('toy2d', eval_samples=200, baseline_fm=False, model_kwargs={'hidden': 16, 'depth': 2}, out=str(tmp_path))
    evaluate_toy(cfg, build_model(cfg, (2,)), None, torch.device('cpu'))
    dcfg = get_config('digits', model='DiT-T/2', out=str(tmp_path / 'd'))
    save_sample_grid(dcfg, build_model(dcfg, (1, 8, 8)), (1, 8, 8), tmp_path / 'd' / 'grid.png', torch.device('cpu'), per_class=2)
    assert len(saved) == 2
    for fig in saved: assert unlabelled(fig) == [], unlabelled(fig)
