"""Host syncs of the training step: none outside log and checkpoint steps. On the CPU every host read of a tensor made
during the non-log steps of a short `train` run is counted (the GPU twin, in tests/gpu, runs them under CUDA's sync
debug mode)."""
import contextlib, sys
import pytest
import torch
import meanflow_nb.core as core
import meanflow_nb.train as T

# The Tensor methods that bring values to the host: on CUDA each waits for the device. `numpy()` is not among them: it
# refuses a CUDA tensor, so a value read through it is on the host by construction.
READS = ('nonzero', 'item', 'tolist', '__bool__', '__float__', '__int__', '__index__')
HOST_BOOKKEEPING = ('torch.optim',)  # AdamW's step count and AveragedModel's n_averaged: CPU tensors by design


def _caller() -> str:
    f = sys._getframe(3)
    return f"{f.f_globals.get('__name__', '?')}:{f.f_lineno}"


@contextlib.contextmanager
def counting(calls: list, active):
    "Patch the host reads of `torch.Tensor` (and `torch.nonzero`, boolean-mask indexing) to append their call site to `calls` while `active()`."
    saved = {n: getattr(torch.Tensor, n) for n in READS + ('__getitem__',)}
    saved_nz = torch.nonzero
    def record(what):
        site = _caller()
        if active() and not site.startswith(HOST_BOOKKEEPING): calls.append(f'{what} at {site}')
    def wrap(n, f):
        def g(self, *a, **k):
            record(n); return f(self, *a, **k)
        return g
    def getitem(self, idx):
        ix = idx if isinstance(idx, tuple) else (idx,)
        if any(torch.is_tensor(i) and i.dtype == torch.bool for i in ix): record('boolean-mask indexing')
        return saved['__getitem__'](self, idx)
    def nonzero(x, *a, **k):
        record('torch.nonzero'); return saved_nz(x, *a, **k)
    try:
        for n in READS: setattr(torch.Tensor, n, wrap(n, saved[n]))
        torch.Tensor.__getitem__, torch.nonzero = getitem, nonzero
        yield
    finally:
        for n, f in saved.items(): setattr(torch.Tensor, n, f)
        torch.nonzero = saved_nz


CASES = {'mf': dict(method='mf', model='DiT-T/2'),
         'kim-minsnr': dict(method='kim', kim_accel='minsnr', model='DiT-T/2'),
         'imf': dict(method='imf', model='iMF-T/2', ratio_r_eq_t=0.5),
         'kim-minsnr-micro': dict(method='kim', kim_accel='minsnr', model='DiT-T/2', micro_batch=6)}  # 3 micro-batches


@pytest.mark.parametrize('case', list(CASES))
def test_no_host_sync_outside_log_steps(tmp_path, monkeypatch, case):
    """4 steps of a tiny class-conditional DiT on digits 8x8 with the balanced r = t split; only the last step logs
    and checkpoints. Every host read during steps 1-3 (from the batch on the device to the next batch) is counted.
    The value checks take their accelerator path (`torch._assert_async`), as they do on CUDA."""
    steps = 4
    cfg = T.get_config('digits', **CASES[case], global_batch=16, steps=steps, log_every=steps, ckpt_every=steps,
                       sample_every=0, ckpt_every_minutes=0.0, r_eq_t_split='balanced', cfg_kappa=0.5,
                       out=str(tmp_path / case))
    monkeypatch.setattr(core, '_host_readable', lambda t: False, raising=False)   # the CUDA path of the value checks
    calls, state = [], dict(fetched=0, on=False)
    class Meter(T._Meter):                       # the window: after step i's batch is fetched, until the next fetch
        def data(self):
            w = super().data()
            class W:
                def __enter__(s): state['on'] = False; return w.__enter__()
                def __exit__(s, *e):
                    r = w.__exit__(*e); state['fetched'] += 1
                    state['on'] = state['fetched'] < steps                  # the last step logs: it may sync
                    return r
            return W()
    monkeypatch.setattr(T, '_Meter', Meter)
    with counting(calls, lambda: state['on']):
        T.train(cfg, progress=False, quiet=True)
        state['on'] = False
    assert state['fetched'] == steps
    assert calls == [], f'{len(calls)} host reads in {steps - 1} non-log steps, e.g. ' + '; '.join(sorted(set(calls))[:8])


def test_counter_sees_a_sync(tmp_path):
    "The counter catches a read on a tensor in the window, and only in the window."
    calls, on = [], [True]
    with counting(calls, lambda: on[0]):
        x = torch.arange(4.)
        bool(x.sum() > 0); x[x > 1]; (x > 1).nonzero(); on[0] = False; float(x.sum())
    assert [c.split(' at ')[0] for c in calls] == ['__bool__', 'boolean-mask indexing', 'nonzero'], calls


def test_kim_syncs_for_observe_only_during_dtd():
    "The trainer reads the loss parts every step for Kim et al. only while DTD's curriculum runs (MinSNR: never)."
    from meanflow_nb.kim import kim_loss
    from meanflow_nb.loss import MeanFlowLoss
    dtd = kim_loss(T.get_config('digits', method='kim', kim_accel='dtd', dtd_clusters=3), MeanFlowLoss())
    assert dtd.needs_observe
    dtd.dtd.state['stage'] = 3                                      # the last stage: the curriculum is done
    assert dtd.dtd.done and not dtd.needs_observe
    assert not kim_loss(T.get_config('digits', method='kim', kim_accel='minsnr'), MeanFlowLoss()).needs_observe
