"""GPU check: the FID of a released checkpoint (default iMF-B/2) through this project's own sampler, SD-VAE decoding
and FID code. Every input is a local file (the GPU machine needs no network):

  --ckpt  the released weights (iMF-B-2.pth from huggingface.co/Lyy0725/iMF)
  --ref   Inception reference statistics with mu, sigma (JiT's jit_in256_stats.npz, the iMF authors' choice,
          or ADM's VIRTUAL_imagenet256_labeled.npz)
  --vae   a local copy of stabilityai/sd-vae-ft-mse (a diffusers folder)
  --inception-weights  torch-fidelity's Inception weights (pt_inception-2015-12-05-6726825d.pth), if not cached

Quick check (5,000 samples, about 10 minutes on one H100-class GPU) and the paper's number (50,000, 1-NFE,
authors' FID 3.32 with JiT's statistics):

  python tests/gpu/pretrained_fid.py --ckpt ckpts/iMF-B-2.pth --ref ref/jit_in256_stats.npz --vae vae/sd-vae-ft-mse -n 5000
  torchrun --standalone --nproc_per_node 8 tests/gpu/pretrained_fid.py --ckpt ckpts/iMF-B-2.pth --ref ref/jit_in256_stats.npz \
      --vae vae/sd-vae-ft-mse -n 50000

FID from 5,000 samples is biased upwards against FID-50K (the sample covariance is noisier), so the quick check only
tells that the pipeline works: it should land a few points above the authors' 50K number, not at it. With -n 50000 the
script exits 1 if the FID differs from the authors' by more than --tolerance. It prints one JSON line: FID, N, NFE,
guidance, hardware, seconds; record it in 13_results.
"""
import argparse, json, sys, time
from pathlib import Path

import torch

from meanflow_nb import dist
from meanflow_nb.core import cli_errors, check
from meanflow_nb.eval import sample_run, imagenet_fid
from meanflow_nb.pretrained import PRETRAINED, pretrained_run


def parser():
    p = argparse.ArgumentParser(description='FID of a released checkpoint through this project\'s pipeline (one or more GPUs).')
    p.add_argument('--name', default='iMF-B/2', choices=list(PRETRAINED), help='which released checkpoint (default iMF-B/2)')
    p.add_argument('--ckpt', required=True, help='the checkpoint file (or the unzipped MF-B/4 folder / its .npz export)')
    p.add_argument('--ref', required=True, help='reference statistics .npz (mu, sigma)')
    p.add_argument('--vae', required=True, help='local sd-vae-ft-mse folder (diffusers layout)')
    p.add_argument('--inception-weights', default=None, help='local torch-fidelity Inception weights (default: its cache)')
    p.add_argument('-n', '--num-samples', type=int, default=5000, help='samples: 5000 for a quick check, 50000 for the paper (default 5000)')
    p.add_argument('--nfe', type=int, default=1, help='network evaluations per sample (default 1)')
    p.add_argument('--batch-size', type=int, default=250, help='samples per network call on each GPU (default 250)')
    p.add_argument('--out', default=None, help='sample folder (default fid_check/NAME_nfeK_nN); reruns resume')
    p.add_argument('--tolerance', type=float, default=0.3, help='50K only: largest accepted |FID - authors\' FID| (default 0.3)')
    return p


@cli_errors
def main(argv=None):
    a = parser().parse_args(argv)
    check(torch.cuda.is_available(), 'no CUDA device: this check samples tens of thousands of ImageNet images')
    for f in (a.ckpt, a.ref, a.vae): check(Path(f).exists(), f'{f} does not exist (every input must be on local disk)')
    spec = PRETRAINED[a.name]
    out = a.out or f'fid_check/{a.name.replace("/", "-")}_nfe{a.nfe}_n{a.num_samples}'
    t0 = time.time()
    try:
        res = sample_run(a.ckpt, out, a.num_samples, a.nfe, batch_size=a.batch_size, vae=a.vae, progress=True,
                         loader=lambda device: pretrained_run(a.name, a.nfe, ckpt=a.ckpt, device=device))
        t_sample = time.time() - t0
        if dist.is_main():
            fid = imagenet_fid(Path(out) / 'samples.npz', a.ref, weights_path=a.inception_weights, batch_size=250, cuda=True)
            paper = dict(spec.fid).get(a.nfe)
            r = dict(name=a.name, nfe=a.nfe, n=a.num_samples, fid=round(fid, 3), authors_fid_50k=paper,
                     guidance={k: res[k] for k in ('eval_omega', 'eval_t_min', 'eval_t_max')}, ref=Path(a.ref).name,
                     gpus=dist.get_world_size(), hardware=torch.cuda.get_device_name(), sample_s=round(t_sample), total_s=round(time.time() - t0))
            print(json.dumps(r))
            if a.num_samples >= 50000 and paper is not None and abs(fid - paper) > a.tolerance:
                print(f'FID {fid:.2f} differs from the authors\' {paper} by more than {a.tolerance}', file=sys.stderr); sys.exit(1)
    finally: dist.cleanup_distributed()


if __name__ == '__main__':
    main()
