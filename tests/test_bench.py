"""mf-bench smoke tests at tiny size: the console script with the DDP part (2 gloo ranks), the table and the JSON."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest

import torch
torch.set_num_threads(1)  # small models on 2 shared cores: extra threads only contend
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')


def test_in_process_parts_table_and_json(tmp_path, capsys):
    "steps, sampling, data and models at tiny size: one table row per measurement, JSON with every part."
    from meanflow_nb.cli import cli_bench
    cli_bench(['steps', 'sampling', 'data', 'models', '--tiny', '--json', str(tmp_path / 'b.json')])
    out = capsys.readouterr().out
    res = json.loads((tmp_path / 'b.json').read_text())
    assert set(res) == {'meta', 'steps', 'sampling', 'data', 'models'}
    assert res['steps']['digits']['mf_over_fm'] > 1.0 and res['steps']['toy2d']['mf_over_fm'] > 1.0
    # 100 network calls against 1 on the same network and batch: the sampling speed-up is the ratio of network calls
    # (per-call overheads alike); a sampler that took another number of steps than it says would fall outside
    sp = res['sampling']
    assert 0.5 < sp['speedup'] / sp['fm_steps'] < 1.5, sp
    for k in ('MF step / FM step', 'iMF step / MF step', '1-NFE samples/s', 'digits loader', 'forward bf16 / fp32'):
        assert k in out, (k, out)


def _fastest_step_s(n: int = 5, **kw) -> float:
    "The fastest of `n` in-process `train_step`s (after one warm-up) of the digits preset with overrides `kw`."
    from meanflow_nb.bench import step_fn
    f = step_fn('digits', **kw)[0]
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def test_console_script_ddp_part(tmp_path):
    """mf-bench ddp --tiny spawns torchrun with 1 and 2 gloo ranks and reports their steps/s and the ratio. The rates are
    checked against clocks of their own: the timed steps of both jobs fit inside the command's wall time (a rate too
    low, such as seconds per step, breaks it), and a 1-thread rank cannot step 5 times faster than the same step timed
    here in process with 1 thread (a rate too high, such as steps per millisecond, breaks it)."""
    from meanflow_nb.bench import SIZES
    S = SIZES['tiny']['ddp']
    exe = Path(sys.executable).parent / 'mf-bench'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'meanflow_nb.bench']
    t0 = time.perf_counter()
    r = subprocess.run(cmd + ['ddp', '--tiny', '--json', str(tmp_path / 'd.json')], capture_output=True, text=True,
                       env=ENV, timeout=300)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / 'd.json').read_text())['ddp']
    assert (d['steps'], d['warmup'], d['model'], d['global_batch']) == (S['steps'], S['warmup'], S['model'], S['batch'])
    timed = S['steps'] - S['warmup']           # logged every step: steps warmup .. steps are timed, one apart each
    assert timed / d['steps_per_s_1'] + timed / d['steps_per_s_2'] < wall, (d, wall)
    ref = _fastest_step_s(model=S['model'], global_batch=S['batch'])
    assert d['steps_per_s_1'] < 5 / ref, (d, ref)
    assert d['steps_per_s_2'] < 10 / ref, (d, ref)   # each of 2 ranks does half the batch
    assert 'DDP 2 ranks / 1 rank' in r.stdout


def test_bad_part_exits_2():
    from meanflow_nb.cli import cli_bench
    with pytest.raises(SystemExit) as ex: cli_bench(['warp', '--tiny'])
    assert ex.value.code == 2


def test_plan_cli(capsys):
    "mf-bench plan: memory per GPU, the micro-batch that fits and GPU-hours; consistent with plan(); bad input exits 2."
    from meanflow_nb.bench import plan
    from meanflow_nb.cli import cli_bench
    r = cli_bench(['plan', '--preset', 'in256-mf-XL2', '--gpus', '8', '--gpu-mem-gb', '80'])
    out = capsys.readouterr().out
    assert 'DiT-XL/2' in out and 'GPU-hours' in out and 'AdamW' in out
    assert r == plan('in256-mf-XL2', 8, 80)
    assert 1 <= r['micro_batch'] <= r['per_gpu_batch'] == 32 and r['peak_gb'] <= 80
    small = plan('in256-mf-XL2', 8, 24)
    assert small['micro_batch'] < r['micro_batch']                            # less memory, smaller micro-batch
    assert plan('in256-mf-XL2', 8, 24, grad_ckpt=True)['micro_batch'] > small['micro_batch']
    with pytest.raises(SystemExit) as ex: cli_bench(['plan', '--preset', 'nope'])
    assert ex.value.code == 2


def test_bench_allreduce_spawns_two_gloo_ranks():
    """The all-reduce timing runs a real 2-process gloo group (its workers check a sum across ranks before timing), so
    it costs more than summing the same values in this process, timed here: a timer around anything that stays inside
    one process (a local sum, a barrier-free no-op) would not."""
    from meanflow_nb.bench import bench_allreduce
    r = bench_allreduce(10_000, world=2, repeats=5)
    a, b, ts = torch.randn(10_000), torch.randn(10_000), []
    for _ in range(50):
        t0 = time.perf_counter()
        a.add_(b)
        ts.append(time.perf_counter() - t0)
    local_ms = 1e3 * sorted(ts)[len(ts) // 2]
    assert r['ms'] > max(3 * local_ms, 0.005) and r['ms'] < 5_000, (r, local_ms)



def test_mixed_tangent_ops_match_a_hand_count():
    """`mixed_tangent_ops` (the count behind `mf-bench host`) on a one-layer module whose mixed calls are counted by
    hand: the linear layer (x carries a tangent, W and b do not), the gate product, the RMSNorm with its weight and the
    concatenation with a buffer are mixed; the sine, the product with a number and the sum of two tangent tensors are
    not. With the weights and the buffer differentiated too (`functional_call`), no call is mixed."""
    import torch.nn.functional as F
    from meanflow_nb.bench import mixed_tangent_ops
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.gate, self.w = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.rand(4)), torch.nn.Parameter(torch.rand(4))
            self.register_buffer('table', torch.rand(2, 4))
        def forward(self, x):
            y = F.linear(x, self.lin.weight, self.lin.bias)   # mixed 1
            y = y * self.gate                                  # mixed 2
            y = F.rms_norm(y, (4,), self.w)                    # mixed 3
            z = torch.cat([y, self.table])                     # mixed 4
            return torch.sin(z) + z * 2                        # sin, mul by a number, add: 3 calls, none mixed
    m, x = One(), torch.randn(2, 4)
    r = mixed_tangent_ops(m, (x,), (torch.ones_like(x),))
    assert (r['mixed'], r['ops']) == (4, 7), r
    assert r['mixed_by_name'] == {'cat': 1, 'linear': 1, 'mul': 1, 'rms_norm': 1}, r
    state = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    r1 = mixed_tangent_ops(lambda p, x_: torch.func.functional_call(m, p, (x_,)), (state, x),
                           ({k: torch.ones_like(v) for k, v in state.items()}, torch.ones_like(x)))
    assert (r1['mixed'], r1['ops']) == (0, 7), r1
    # the calls that ran torch's Python reference decompositions, in torch 2.14 (a cProfile of `jvp(lambda a: a * w)`
    # shows torch._refs.mul and its _broadcast_shapes): the three mixed calls with a weight, and the product with a
    # number (a number is a tensor from outside the JVP too); not the cat with a buffer. Differentiating everything
    # leaves the product with the number.
    if torch.__version__.startswith('2.14'):
        assert r['fallback_by_name'] == {'linear': 1, 'mul': 2, 'rms_norm': 1}, r
        assert r1['fallback_by_name'] == {'mul': 1}, r1
    assert r['fallback'] <= r['ops'] and r1['fallback'] < r['fallback']
