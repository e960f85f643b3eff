"""Released checkpoints without the real weights: synthetic files in the official formats (the official names and
layouts, random values) are converted by `meanflow_nb.pretrained`, and the converted networks are compared with
separate implementations of the official forward passes written here from the official code's layout:
iMF's PyTorch `imfDiT` (branch `torch` of Lyy-iiis/imeanflow, `models/imfDiT.py`) and MeanFlow's flax `DiT`
(Gsunshine/meanflow, `models/models_dit.py`, channels-last). Nothing here uses our model classes' code paths."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meanflow_nb.core import ConfigError
import meanflow_nb.pretrained as P
from meanflow_nb.pretrained import load_pretrained, pretrained_run, PRETRAINED
from meanflow_nb.cli import cli_sample

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------------------
# iMF: official state dict (eval-mode `iMeanFlow`, names start with `net.`) and the official forward
# ---------------------------------------------------------------------------------------------------------------
TOKENS = dict(class_tokens=8, omega_tokens=4, t_min_tokens=2, t_max_tokens=2, time_tokens=4)


def official_imf_sd(D=32, heads=2, trunk=2, head=1, C=4, p=2, ncls=10, v_heads=False, seed=0, dtype=torch.float64):
    "Random tensors under every name an official `imfDiT` state dict has (eval mode: no v-head blocks)."
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=None: torch.randn(*s, generator=g, dtype=dtype) * (std if std is not None else 1 / math.sqrt(s[-1]))
    hd, M = D // heads, int(D * 8 / 3)
    sd = {'net.x_embedder.proj.weight': r(D, C, p, p, std=0.3), 'net.x_embedder.proj.bias': r(D, std=0.1)}
    for e in ('h_embedder', 'omega_embedder', 'cfg_t_start_embedder', 'cfg_t_end_embedder'):
        sd.update({f'net.{e}.mlp.0._flax_linear.weight': r(D, 256), f'net.{e}.mlp.0._flax_linear.bias': r(D, std=0.1),
                   f'net.{e}.mlp.2._flax_linear.weight': r(D, D), f'net.{e}.mlp.2._flax_linear.bias': r(D, std=0.1)})
    sd['net.y_embedder.embedding_table._flax_embedding.weight'] = r(ncls + 1, D, std=0.5)
    sd.update({f'net.{k}': r(n, D, std=0.5) for k, n in TOKENS.items()})
    groups = [('shared_blocks', trunk), ('u_heads', head)] + ([('v_heads', head)] if v_heads else [])
    for grp, n in groups:
        for i in range(n):
            b = f'net.{grp}.{i}.'
            sd.update({b + 'norm1.weight': 1 + r(D, std=0.1), b + 'norm2.weight': 1 + r(D, std=0.1),
                       b + 'attn.q_norm.weight': 1 + r(hd, std=0.1), b + 'attn.k_norm.weight': 1 + r(hd, std=0.1),
                       b + 'mlp.w1._flax_linear.weight': r(M, D), b + 'mlp.w3._flax_linear.weight': r(M, D),
                       b + 'mlp.w2._flax_linear.weight': r(D, M), b + 'attn_scale': r(D, std=0.5), b + 'mlp_scale': r(D, std=0.5)})
            sd.update({b + f'attn.{c}_proj._flax_linear.weight': r(D, D) for c in ('q', 'k', 'v', 'out')})
    for f in ('u_final_layer', 'v_final_layer'):  # the eval-mode model keeps an (unused) v_final_layer
        sd.update({f'net.{f}.norm.weight': 1 + r(D, std=0.1), f'net.{f}.linear._flax_linear.weight': r(p * p * C, D),
                   f'net.{f}.linear._flax_linear.bias': r(p * p * C, std=0.1)})
    return sd


def _rms(x, w, eps=1e-6): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
def _lin(sd, name, x): return F.linear(x, sd[name + '._flax_linear.weight'], sd.get(name + '._flax_linear.bias'))


def _temb(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    a = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


def _embed(sd, name, s):  # TimestepEmbedder: sinusoid -> Linear -> SiLU -> Linear
    x = _temb(s).to(sd[f'{name}.mlp.0._flax_linear.weight'].dtype)
    return _lin(sd, f'{name}.mlp.2', F.silu(_lin(sd, f'{name}.mlp.0', x)))


def _rope(x, pos_freqs):  # the official rotation: channel pairs (2i, 2i+1) as complex numbers
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * pos_freqs[None, :, None, :]).reshape(x.shape)


def _official_block(sd, b, x, freqs, heads):
    B, T, D = x.shape
    hd = D // heads
    h = _rms(x, sd[b + 'norm1.weight'])
    q, k, v = [_lin(sd, f'{b}attn.{c}_proj', h).reshape(B, T, heads, hd) for c in 'qkv']
    q, k = _rms(q, sd[b + 'attn.q_norm.weight']), _rms(k, sd[b + 'attn.k_norm.weight'])
    q, k = _rope(q, freqs), _rope(k, freqs)
    w = torch.einsum('bqhd,bkhd->bhqk', q / math.sqrt(hd), k).softmax(-1)
    a = _lin(sd, b + 'attn.out_proj', torch.einsum('bhqk,bkhd->bqhd', w, v).reshape(B, T, D))
    x = x + a * sd[b + 'attn_scale']
    h = _rms(x, sd[b + 'norm2.weight'])
    m = _lin(sd, b + 'mlp.w2', F.silu(_lin(sd, b + 'mlp.w1', h)) * _lin(sd, b + 'mlp.w3', h))
    return x + m * sd[b + 'mlp_scale']


def official_imf_u(sd, x, h, w, t_min, t_max, y, heads):
    "u of the official `imfDiT.forward` (eval mode), written from its layout with the official tensors."
    B, C, H, W = x.shape
    p = sd['net.x_embedder.proj.weight'].shape[-1]
    xe = F.conv2d(x, sd['net.x_embedder.proj.weight'], sd['net.x_embedder.proj.bias'], stride=p)
    xe = xe.permute(0, 2, 3, 1).reshape(B, -1, xe.shape[1])  # NCHW -> NLC
    emb = dict(time_tokens=_embed(sd, 'net.h_embedder', h), omega_tokens=_embed(sd, 'net.omega_embedder', 1 - 1 / w),
               t_min_tokens=_embed(sd, 'net.cfg_t_start_embedder', t_min), t_max_tokens=_embed(sd, 'net.cfg_t_end_embedder', t_max),
               class_tokens=sd['net.y_embedder.embedding_table._flax_embedding.weight'][y])
    order = ['class_tokens', 'omega_tokens', 't_min_tokens', 't_max_tokens', 'time_tokens']
    seq = torch.cat([sd[f'net.{k}'][None] + emb[k][:, None] for k in order] + [xe], 1)
    P_ = sum(TOKENS.values())
    hd = xe.shape[-1] // heads
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(torch.arange(seq.shape[1], dtype=torch.float64), freqs)
    pos = torch.polar(torch.ones_like(ang), ang).to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    nb = lambda g: len({k.split('.')[2] for k in sd if k.startswith(f'net.{g}.')})
    for i in range(nb('shared_blocks')): seq = _official_block(sd, f'net.shared_blocks.{i}.', seq, pos, heads)
    for i in range(nb('u_heads')): seq = _official_block(sd, f'net.u_heads.{i}.', seq, pos, heads)
    out = _lin(sd, 'net.u_final_layer.linear', _rms(seq[:, P_:], sd['net.u_final_layer.norm.weight']))
    g = H // p
    out = out.reshape(B, g, g, p, p, C)
    return torch.einsum('nhwpqc->nchpwq', out).reshape(B, C, H, W)


def imf_inputs(B=3, C=4, S=8, ncls=10, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, S, S, generator=g, dtype=dtype)
    h = torch.tensor([0.0, 0.4, 1.0], dtype=dtype)[:B]
    w = torch.tensor([1.0, 3.0, 8.0], dtype=dtype)[:B]
    return x, h, w, torch.full((B,), 0.2, dtype=dtype), torch.full((B,), 0.7, dtype=dtype), torch.tensor([0, 3, ncls])[:B]


@pytest.fixture
def imf_file(tmp_path):
    sd = {k: v.float() for k, v in official_imf_sd().items()}                           # the files are float32
    torch.save(sd, tmp_path / 'tiny.pth')
    return tmp_path / 'tiny.pth', {k: v.double() for k, v in sd.items()}


def test_imf_matches_official_forward(imf_file):
    path, sd = imf_file
    net = load_pretrained(path, input_size=8)
    assert not net.has_v_head and net.tokens == (8, 4, 2, 2, 4) and len(net.blocks) == 2 and len(net.u_blocks) == 1
    x, h, w, a, b, y = imf_inputs()
    ref = official_imf_u(sd, x, h, w, a, b, y, heads=2)                                  # float64, official layout
    ours = net.double()(x, h, w, a, b, y, return_v=False)
    assert (ours - ref).abs().max() < 1e-10, (ours - ref).abs().max()                   # the layouts agree exactly
    sd32 = {k: v.float() for k, v in sd.items()}
    ref32 = official_imf_u(sd32, *[t.float() if t.is_floating_point() else t for t in (x, h, w, a, b)], y, heads=2)
    ours32 = net.float()(x.float(), h.float(), w.float(), a.float(), b.float(), y, return_v=False)
    err = (ours32 - ref32).abs().max().item()
    print(f'iMF float32: max |ours - official| = {err:.1e} (output scale {ref32.abs().max():.2f})')
    assert err < 1e-5 * max(1.0, ref32.abs().max().item())


def test_imf_training_file_keeps_v_head(tmp_path):
    sd = official_imf_sd(v_heads=True, seed=4)
    torch.save(sd, tmp_path / 'train.pth')
    net = load_pretrained(tmp_path / 'train.pth', input_size=8)
    assert net.has_v_head and len(net.v_blocks) == 1
    torch.testing.assert_close(net.v_final.linear.weight, sd['net.v_final_layer.linear._flax_linear.weight'].float())


@pytest.mark.parametrize('damage, expect', [
    (lambda sd: sd.pop('net.shared_blocks.1.attn.k_proj._flax_linear.weight'), 'missing net.shared_blocks.1.attn.k_proj'),
    (lambda sd: sd.__setitem__('net.u_heads.0.mlp_scale', torch.zeros(33)), 'wrong shape net.u_heads.0.mlp_scale (33,)'),
    (lambda sd: sd.__setitem__('net.extra_tokens', torch.zeros(2, 32)), 'unused net.extra_tokens'),
    (lambda sd: sd.pop('net.x_embedder.proj.weight'), "no 'net.x_embedder.proj.weight'"),
])
def test_imf_damaged_file_one_clear_error(tmp_path, damage, expect):
    sd = official_imf_sd()
    damage(sd)
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(ConfigError) as ei: load_pretrained(tmp_path / 'bad.pth', input_size=8)
    msg = str(ei.value)
    assert expect in msg and '\n' not in msg, msg


def test_wrong_size_for_a_name(imf_file):
    with pytest.raises(ConfigError, match='hidden_size 32 in the file, 768 in iMF-B/2'):
        load_pretrained(imf_file[0], model='iMF-B/2')


def test_not_a_checkpoint(tmp_path):
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ConfigError, match='neither an official iMF state dict nor a MeanFlow flax tree'):
        load_pretrained(tmp_path / 'other.pth')


# ---------------------------------------------------------------------------------------------------------------
# MF-B/4: flax parameter tree of the JAX DiT (channels-last), EMA weights under ema_params/net
# ---------------------------------------------------------------------------------------------------------------
def official_mf_tree(D=32, depth=2, C=4, p=2, ncls=10, seed=0, dtype=np.float64):
    "Random arrays at every path of the flax `DiT` params (kernels `(in, out)`, conv kernel HWIO)."
    rng = np.random.default_rng(seed)
    r = lambda *s, std=None: (rng.standard_normal(s) * (std if std is not None else 1 / math.sqrt(s[0] if len(s) == 2 else np.prod(s[:-1])))).astype(dtype)
    dense = lambda pre, i, o: {f'{pre}/_flax_linear/kernel': r(i, o), f'{pre}/_flax_linear/bias': r(o, std=0.1)}
    t = {'x_embedder/proj/kernel': r(p, p, C, D), 'x_embedder/proj/bias': r(D, std=0.1),
         'y_embedder/embedding_table/_flax_embedding/embedding': r(ncls + 1, D, std=0.5)}
    for e in ('t_embedder', 'h_embedder'): t.update({**dense(f'{e}/mlp/layers_0', 256, D), **dense(f'{e}/mlp/layers_2', D, D)})
    for i in range(depth):
        b = f'blocks/layers_{i}/'
        t.update({**dense(b + 'attn/qkv', D, 3 * D), **dense(b + 'attn/proj', D, D), **dense(b + 'mlp/fc1', D, 4 * D),
                  **dense(b + 'mlp/fc2', 4 * D, D), **dense(b + 'adaLN_modulation/layers_1', D, 6 * D)})
    t.update({**dense('final_layer/linear', D, p * p * C), **dense('final_layer/adaLN_modulation/layers_1', D, 2 * D)})
    return t


def _pos_embed(D, g):  # MAE's 2-D sin-cos table, as the JAX code builds it (np.meshgrid(w, h): w first)
    def one(d, pos):
        om = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
        out = np.einsum('m,d->md', pos.reshape(-1), om)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0).reshape(2, 1, g, g)
    return np.concatenate([one(D // 2, grid[0]), one(D // 2, grid[1])], 1)


def official_mf_u(t, x, tt, hh, y, heads):
    "u of the flax `DiT.__call__` in NHWC, written with numpy-layout tensors (kernels `(in, out)`)."
    T = {k: torch.as_tensor(v) for k, v in t.items()}
    dense = lambda pre, a: a @ T[f'{pre}/_flax_linear/kernel'] + T[f'{pre}/_flax_linear/bias']
    B, H, W, C = x.shape
    K = T['x_embedder/proj/kernel']; p, D = K.shape[0], K.shape[-1]; g = H // p
    patches = x.reshape(B, g, p, g, p, C).permute(0, 1, 3, 2, 4, 5)                     # (B, gh, gw, p, q, C)
    z = torch.einsum('bhwpqc,pqcd->bhwd', patches, K) + T['x_embedder/proj/bias']
    z = z.reshape(B, g * g, D) + torch.as_tensor(_pos_embed(D, g)).float().to(x.dtype)  # JAX: .astype(float32)
    emb = lambda e, s: dense(f'{e}/mlp/layers_2', F.silu(dense(f'{e}/mlp/layers_0', _temb(s).to(x.dtype))))
    c = emb('t_embedder', tt) + emb('h_embedder', hh) + T['y_embedder/embedding_table/_flax_embedding/embedding'][y]
    ln = lambda a: (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-6)
    mod = lambda a, sh, sc: a * (1 + sc[:, None]) + sh[:, None]
    depth = len({k.split('/')[1] for k in t if k.startswith('blocks/')})
    for i in range(depth):
        b = f'blocks/layers_{i}/'
        s1, c1, g1, s2, c2, g2 = dense(b + 'adaLN_modulation/layers_1', F.silu(c)).chunk(6, 1)
        a = mod(ln(z), s1, c1); N = a.shape[1]; hd = D // heads
        qkv = dense(b + 'attn/qkv', a).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] * hd ** -0.5) @ qkv[1].transpose(-1, -2)).softmax(-1) @ qkv[2]
        z = z + g1[:, None] * dense(b + 'attn/proj', att.permute(0, 2, 1, 3).reshape(B, N, D))
        m = dense(b + 'mlp/fc2', F.gelu(dense(b + 'mlp/fc1', mod(ln(z), s2, c2)), approximate='tanh'))
        z = z + g2[:, None] * m
    sh, sc = dense('final_layer/adaLN_modulation/layers_1', F.silu(c)).chunk(2, 1)
    out = dense('final_layer/linear', mod(ln(z), sh, sc)).reshape(B, g, g, p, p, C)
    return torch.einsum('nhwpqc->nhpwqc', out).reshape(B, H, W, C)                       # NHWC


@pytest.fixture
def mf_file(tmp_path):
    ema, raw = official_mf_tree(seed=0, dtype=np.float32), official_mf_tree(seed=9, dtype=np.float32)
    arrays = {f'ema_params/net/{k}': v for k, v in ema.items()}
    arrays.update({f'params/net/{k}': v.astype(np.float32) for k, v in raw.items()})     # raw weights: must not be picked
    arrays['opt_state/1/0/mu/net/x_embedder/proj/bias'] = np.zeros(32, np.float32); arrays['step'] = np.array(7)
    np.savez(tmp_path / 'mf_tiny.npz', **arrays)
    return tmp_path / 'mf_tiny.npz', ema


def test_mf_matches_official_forward(mf_file):
    path, ema = mf_file
    net = load_pretrained(path, input_size=8, num_heads=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 8, 4, generator=g, dtype=torch.float64)                           # NHWC, as the JAX model
    t, h, y = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64), torch.tensor([0, 5, 10])
    ref = official_mf_u({k: v.astype(np.float64) for k, v in ema.items()}, x, t, h, y, heads=2)
    ours = net.double()(x.permute(0, 3, 1, 2), t, h, y).permute(0, 2, 3, 1)
    assert (ours - ref).abs().max() < 1e-10, (ours - ref).abs().max()
    ref32 = official_mf_u(ema, x.float(), t.float(), h.float(), y, heads=2)
    err = (net.float()(x.float().permute(0, 3, 1, 2), t.float(), h.float(), y).permute(0, 2, 3, 1) - ref32).abs().max().item()
    print(f'MF float32: max |ours - official| = {err:.1e} (output scale {ref32.abs().max():.2f})')
    assert err < 1e-5 * max(1.0, ref32.abs().max().item())


def test_mf_heads_needed_for_unknown_width(mf_file):
    with pytest.raises(ConfigError, match='pass num_heads='): load_pretrained(mf_file[0], input_size=8)


def test_mf_partial_tree(tmp_path):
    t = official_mf_tree(); del t['blocks/layers_1/mlp/fc2/_flax_linear/kernel']
    np.savez(tmp_path / 'bad.npz', **{f'ema_params/net/{k}': v for k, v in t.items()})
    with pytest.raises(ConfigError, match=r'missing blocks\.layers_1\.mlp\.fc2\._flax_linear\.kernel'):
        load_pretrained(tmp_path / 'bad.npz', input_size=8, num_heads=2)


def test_orbax_folder_without_tensorstore(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, '__import__', lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n)) if n == 'tensorstore' else real(n, *a, **k))
    (tmp_path / 'ckpt').mkdir()
    with pytest.raises(ConfigError, match='pip install tensorstore'): load_pretrained(tmp_path / 'ckpt')


# ---------------------------------------------------------------------------------------------------------------
# finding files, and the command line
# ---------------------------------------------------------------------------------------------------------------
def test_offline_names_the_file(tmp_path, monkeypatch, capsys):
    def offline(repo, file, d): raise OSError('Cannot reach the Hub (offline)')
    monkeypatch.setattr(P, '_hub_download', offline)
    monkeypatch.setenv('MEANFLOW_PRETRAINED', str(tmp_path / 'cache'))
    with pytest.raises(SystemExit) as ei: cli_sample(['--pretrained', 'iMF-XL/2', '-n', '4', '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and '\n' not in err and 'Traceback' not in err, err
    assert 'iMF-XL-2.pth' in err and str(tmp_path / 'cache') in err and 'huggingface.co/Lyy0725/iMF' in err, err


def test_named_file_found_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MEANFLOW_PRETRAINED', str(tmp_path))
    (tmp_path / 'iMF-B-2.pth').touch()
    assert P.resolve_checkpoint('iMF-B/2', download=False) == tmp_path / 'iMF-B-2.pth'


def test_pretrained_run_settings(imf_file):
    cfg = P.pretrained_config(PRETRAINED['iMF-XL/2'], 'imf', 'iMF-XL/2', nfe=2)
    assert (cfg.eval_omega, cfg.eval_t_min, cfg.eval_t_max) == (4.0, 0.36, 0.64)
    cfg, net, shape, _ = pretrained_run(imf_file[0], nfe=1)
    assert cfg.method == 'imf' and cfg.data_kwargs == {'normalization': 'imf'} and shape == (4, 32, 32) and cfg.num_classes == 1000


def test_cli_sample_pretrained_file(tmp_path, capsys):
    "mf-sample --pretrained FILE end to end: a tiny official-format iMF file, a tiny VAE, 4 class-balanced samples."
    from meanflow_nb.data import tiny_vae
    sd = official_imf_sd(ncls=1000, seed=3)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / 'tiny.pth')
    tiny_vae(seed=1).save_pretrained(tmp_path / 'vae')
    args = ['--pretrained', str(tmp_path / 'tiny.pth'), '-n', '4', '--nfe', '2', '--omega', '3.0', '--batch-size', '4',
            '--vae', str(tmp_path / 'vae'), '--out', str(tmp_path / 'out'), '--no-progress']
    cli_sample(args)
    out = np.load(tmp_path / 'out' / 'samples.npz')
    assert out['arr_0'].shape == (4, 64, 64, 3) and out['arr_0'].dtype == np.uint8 and list(out['arr_1']) == [0, 1, 2, 3]
    import json
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert meta['method'] == 'imf' and meta['eval_omega'] == 3.0 and meta['nfe'] == 2


def _write_orbax(folder, arrays: dict):
    "An orbax-style flax checkpoint: one zarr (v2, zstd) array per tree path, named by the dotted path, in one OCDBT store."
    ts = pytest.importorskip('tensorstore')
    kv = {'driver': 'ocdbt', 'base': {'driver': 'file', 'path': str(folder) + '/'}}
    for name, a in arrays.items():
        spec = {'driver': 'zarr', 'kvstore': {**kv, 'path': name + '/'},
                'metadata': {'shape': list(a.shape), 'chunks': list(a.shape), 'compressor': {'id': 'zstd'}, 'dtype': a.dtype.str}}
        t = ts.open(spec, create=True, open=True).result()
        t.write(a).result()
    (folder / '_METADATA').write_text('{}')


def test_mf_orbax_folder(tmp_path):
    "The unzipped MF-B/4 download is a flax/orbax folder: read through tensorstore, converted like the .npz export."
    ema = official_mf_tree(seed=0, dtype=np.float32)
    arrays = {f'ema_params.net.{k.replace("/", ".")}': v for k, v in ema.items()}
    arrays['params.net.x_embedder.proj.bias'] = np.ones(32, np.float32); arrays['step'] = np.array(5, np.int64)
    (tmp_path / 'ckpt').mkdir()
    _write_orbax(tmp_path / 'ckpt', arrays)
    assert (tmp_path / 'ckpt' / 'manifest.ocdbt').exists()
    net = load_pretrained(tmp_path / 'ckpt', input_size=8, num_heads=2)
    torch.testing.assert_close(net.x_embedder.proj.weight, torch.from_numpy(ema['x_embedder/proj/kernel']).permute(3, 2, 0, 1))
    torch.testing.assert_close(net.blocks[1].mlp[2].weight, torch.from_numpy(ema['blocks/layers_1/mlp/fc2/_flax_linear/kernel']).T)


# ---------------------------------------------------------------------------------------------------------------
# MF-B/4 as flax writes it without tensorstore: msgpack (flax.serialization), single file, orbax aggregate, step folders
# ---------------------------------------------------------------------------------------------------------------
def flax_msgpack(tree) -> bytes:
    "What `flax.serialization.msgpack_serialize` writes: nested dicts, arrays as extension 1 `(shape, dtype name, bytes)`, numpy scalars as 3."
    msgpack = pytest.importorskip('msgpack')
    def ext(x):
        if isinstance(x, np.ndarray): return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes('C')), use_bin_type=True))
        if isinstance(x, np.generic): return msgpack.ExtType(3, msgpack.packb(((), x.dtype.name, np.asarray(x).tobytes()), use_bin_type=True))
        return x
    return msgpack.packb(tree, default=ext, strict_types=True)


def nest(flat: dict) -> dict:
    "`{'a/b/c': v}` -> `{'a': {'b': {'c': v}}}` (a flax state tree)."
    out = {}
    for k, v in flat.items():
        *path, last = k.split('/'); d = out
        for p in path: d = d.setdefault(p, {})
        d[last] = v
    return out


def mf_state(seed):
    ema = official_mf_tree(seed=seed, dtype=np.float32)
    state = {'ema_params': {'net': nest(ema)}, 'params': {'net': nest(official_mf_tree(seed=seed + 50, dtype=np.float32))},
             'step': np.int64(7), 'opt_state': {'0': {'count': np.array(3, np.int32)}}}
    return state, ema


def check_loaded(net, ema):
    torch.testing.assert_close(net.x_embedder.proj.weight, torch.from_numpy(ema['x_embedder/proj/kernel']).permute(3, 2, 0, 1))
    torch.testing.assert_close(net.blocks[1].mlp[2].weight, torch.from_numpy(ema['blocks/layers_1/mlp/fc2/_flax_linear/kernel']).T)


def test_mf_flax_msgpack_single_file(tmp_path):
    "flax's older single-file checkpoint (`checkpoint_<step>`, no suffix): msgpack, EMA weights taken."
    state, ema = mf_state(0)
    (tmp_path / 'checkpoint_7').write_bytes(flax_msgpack(state))
    check_loaded(load_pretrained(tmp_path / 'checkpoint_7', input_size=8, num_heads=2), ema)


def test_mf_orbax_aggregated_msgpack(tmp_path):
    "An orbax folder whose arrays were aggregated: a msgpack `checkpoint` beside `_METADATA`, read without tensorstore."
    state, ema = mf_state(1)
    d = tmp_path / 'ckpt'; d.mkdir(); (d / '_METADATA').write_text('{}'); (d / 'checkpoint').write_bytes(flax_msgpack(state))
    check_loaded(load_pretrained(d, input_size=8, num_heads=2), ema)


def test_mf_newest_step_folder_is_taken(tmp_path):
    "A parent folder of `checkpoint_<step>` entries: the highest step (12, not 3, though '3' sorts after '12')."
    old, _ = mf_state(2); new, ema = mf_state(3)
    for step, st in ((3, old), (12, new)):
        d = tmp_path / f'checkpoint_{step}'; d.mkdir(); (d / '_METADATA').write_text('{}'); (d / 'checkpoint').write_bytes(flax_msgpack(st))
    (tmp_path / 'notes.txt').write_text('not a step')
    check_loaded(load_pretrained(tmp_path, input_size=8, num_heads=2), ema)


def test_flax_msgpack_chunks_bfloat16_and_damage(tmp_path):
    "Arrays flax chunked (over 1 GiB) are joined, bfloat16 is kept, and a torn file is one ConfigError."
    from meanflow_nb.pretrained import read_checkpoint
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunked = {'__msgpack_chunked_array__': True, 'shape': {'0': 3, '1': 4},
               'chunks': {'0': a.reshape(-1)[:5].copy(), '1': a.reshape(-1)[5:].copy()}}
    bf = torch.tensor([1.5, -2.0]).to(torch.bfloat16)
    msgpack = pytest.importorskip('msgpack')
    bf_ext = msgpack.ExtType(1, msgpack.packb(((2,), 'bfloat16', bf.view(torch.int16).numpy().tobytes()), use_bin_type=True))
    raw = flax_msgpack({'w': {'big': chunked}})
    (tmp_path / 'ck').write_bytes(raw)
    torch.testing.assert_close(read_checkpoint(tmp_path / 'ck')['w.big'], torch.from_numpy(a))
    (tmp_path / 'bf').write_bytes(msgpack.packb({'x': bf_ext}))
    got = read_checkpoint(tmp_path / 'bf')['x']
    assert got.dtype == torch.bfloat16 and torch.equal(got, bf)
    (tmp_path / 'torn').write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ConfigError, match='as flax msgpack'): read_checkpoint(tmp_path / 'torn')
