"""Throughput probe of the paper-scale path on one GPU: `pytest tests/gpu -q -rP` prints img/s and peak memory of a
DiT-B/2 MeanFlow step and an iMF-B/2 step on synthetic 32x32x4 latents, eager and compiled, bf16 autocast with the
fp32 JVP (the in256 presets' settings), and a batch-1 probe of the host overhead. Skipped without CUDA; about 4 to 6
minutes on an H100 (most of it compiling). The asserts are sanity bounds; the printed numbers are the record."""
import time, warnings
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
DEV = torch.device('cuda', 0)
BATCH, STEPS, WARMUP = 64, 8, 2


def _setup(name: str, batch: int, seed: int = 0):
    from meanflow_nb.models import create_model
    from meanflow_nb.loss import MeanFlowLoss
    from meanflow_nb.imf import IMFLoss
    torch.manual_seed(seed)
    imf = name.startswith('iMF')
    m = create_model(name, input_size=32, in_channels=4, num_classes=1000).to(DEV)
    lf = (IMFLoss(num_classes=1000, ratio_r_eq_t=0.5) if imf else
          MeanFlowLoss(num_classes=1000, ratio_r_eq_t=0.75, cfg_omega=0.2, cfg_kappa=0.92, cfg_t_end=0.75))  # in256 recipes
    g = torch.Generator(device=DEV).manual_seed(seed)
    x, y = torch.randn(batch, 4, 32, 32, device=DEV, generator=g), torch.randint(0, 1000, (batch,), device=DEV, generator=g)
    return m, lf, x, y, g


def _run(name: str, batch: int, compiled: bool, steps: int = STEPS, warmup: int = WARMUP) -> dict:
    "img/s over `steps` timed optimiser steps (after `warmup`, which includes compiling), peak GiB, compile/warm-up seconds."
    from meanflow_nb.train import train_step, compiled_step, set_precision
    set_precision(True, DEV)
    m, lf, x, y, g = _setup(name, batch)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    fn = compiled_step() if compiled else None
    draws = [lf.draw(batch, x.shape[1:], g, DEV)] * (warmup + steps)     # one draw: fixed shapes, so one compile
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        t0 = time.perf_counter()
        for i in range(warmup): train_step(m, lf, opt, x, y, draws[i], i, 100, bf16=True, sync=False, step_fn=fn)
        torch.cuda.synchronize(); t_warm = time.perf_counter() - t0
        if fn is not None and fn.failed: raise RuntimeError('compiling failed; train_step went on eagerly (see the line above)')
        torch.cuda.reset_peak_memory_stats(DEV)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps): train_step(m, lf, opt, x, y, draws[i], i, 100, bf16=True, sync=False, step_fn=fn)
        torch.cuda.synchronize(); dt = time.perf_counter() - t0
    r = dict(img_per_s=batch * steps / dt, step_ms=1e3 * dt / steps, peak_gib=torch.cuda.max_memory_allocated(DEV) / 2 ** 30,
             warmup_s=t_warm)
    del m, opt; torch.cuda.empty_cache()
    return r


@pytest.mark.parametrize('name', ['DiT-B/2', 'iMF-B/2'])
def test_throughput_eager_and_compiled(name):
    "img/s and peak memory of one method's training step, eager and compiled (`compiled_step`), batch 64, bf16 + fp32 JVP."
    res = {}
    for compiled in (False, True):
        try: res[compiled] = _run(name, BATCH, compiled)
        except Exception as ex:                                              # a compile failure is a finding, not a crash
            if not compiled: raise
            print(f'{name} compiled: failed: {type(ex).__name__}: {str(ex).splitlines()[0][:300]}'); continue
        r = res[compiled]
        print(f"{name} {'compiled' if compiled else 'eager   '}: {r['img_per_s']:.0f} img/s, {r['step_ms']:.1f} ms/step, "
              f"peak {r['peak_gib']:.2f} GiB, warm-up {r['warmup_s']:.1f} s (batch {BATCH})")
        assert r['img_per_s'] > 0 and r['peak_gib'] < 70, r
    if True in res: print(f"{name} compiled / eager: {res[True]['img_per_s'] / res[False]['img_per_s']:.2f}x")


def test_batch1_host_bound_probe():
    """Batch 1, DiT-B/2 MeanFlow, eager: how long the host takes to launch 20 steps against their wall time. When the
    launches take nearly the whole wall time, the GPU runs ahead of nothing: the step is bound by the host (Python,
    kernel launches), which CUDA graphs or `torch.compile` would cut."""
    from meanflow_nb.train import train_step, set_precision
    set_precision(True, DEV)
    m, lf, x, y, g = _setup('DiT-B/2', 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    draws = [lf.draw(1, x.shape[1:], g, DEV) for _ in range(25)]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for i in range(5): train_step(m, lf, opt, x, y, draws[i], i, 100, bf16=True, sync=False)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter(); start.record()
        for i in range(5, 25): train_step(m, lf, opt, x, y, draws[i], i, 100, bf16=True, sync=False)
        end.record(); host_s = time.perf_counter() - t0                     # host side: until the last launch returns
        torch.cuda.synchronize(); wall_s = time.perf_counter() - t0
    gpu_ms = start.elapsed_time(end) / 20
    print(f'DiT-B/2 batch 1, eager: {1e3 * wall_s / 20:.1f} ms/step wall, {1e3 * host_s / 20:.1f} ms/step to launch '
          f'({host_s / wall_s:.0%} of the wall time: near 100 %, the GPU waits on the host), {gpu_ms:.1f} ms/step between '
          f'the first and the last CUDA event')
    assert 0 < host_s <= wall_s and gpu_ms > 0
