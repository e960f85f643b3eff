"""Why `meanflow_nb.dist` syncs gradients by hand: DDP does not reduce gradients of a forward that bypasses its wrapper.

`07_dist` states this; the two-rank training tests of the helpers themselves are in `tests/test_train.py`."""
import json, os, subprocess, sys

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')

SCRIPT = r'''
import json, torch, torch.distributed as td, torch.nn as nn
from meanflow_nb import dist
dist.init_distributed('gloo'); rank = dist.get_rank()
torch.manual_seed(0); m = nn.Linear(3, 1); ddp = nn.parallel.DistributedDataParallel(m)
x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)) + rank   # different data on each rank
def same_on_both_ranks():
    g = [torch.zeros_like(m.weight.grad) for _ in range(2)]; td.all_gather(g, m.weight.grad)
    return bool(torch.allclose(g[0], g[1]))
out = {}
for how in ('wrapper', 'module', 'jvp', 'module+sync'):
    m.zero_grad()
    if how == 'wrapper': ddp(x).sum().backward()                           # DDP.forward prepares the reducer
    elif how == 'jvp':                                                     # what the MeanFlow loss does
        u, dudt = torch.func.jvp(ddp.module, (x,), (torch.ones_like(x),)); (u.sum() + dudt.sum()).backward()
    else: ddp.module(x).sum().backward()                                   # bypasses DDP.forward
    if how == 'module+sync': dist.sync_gradients(m)
    out[how] = same_on_both_ranks()
if rank == 0: print(json.dumps(out))
dist.cleanup_distributed()
'''


def test_ddp_does_not_reduce_a_forward_that_bypasses_it(tmp_path):
    "Gradients agree across 2 gloo ranks after ddp(x), differ after ddp.module(x) or a JVP of it, agree after sync_gradients."
    script = tmp_path / 'ddp_bypass.py'; script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith('{')][-1])
    assert res == {'wrapper': True, 'module': False, 'jvp': False, 'module+sync': True}, res
