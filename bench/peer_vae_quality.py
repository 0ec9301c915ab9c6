"""The peer side of `bench/run.py vae_quality`: DALLE-pytorch's DiscreteVAE trained for a fixed time.

Runs inside the peer's venv (shared/anchors/setup_dalle_pytorch.sh); reads the images that
bench/run.py decoded to .npy, so both sides see the same pixels. Training as DALLE-pytorch's
train_vae.py does it (batch 8, Adam, lr 1e-3, MSE loss, no KL), with DiscreteVAE's default Gumbel
temperature, at the demo's shape: 64x64 -> 16x16 codes of 512. Prints one JSON line.

Batch 8 is train_vae.py's BATCH_SIZE. This script had used 32. At 1 thread each, side by side, for
5 minutes, batch 8 reached 22.0 dB against 18.7 at batch 32 (1782 against 408 steps), so 32 had
understated the peer.
Usage: python bench/peer_vae_quality.py TRAIN.npy VAL.npy MINUTES THREADS
"""

import json
import math
import sys
import time

import numpy as np
import torch
from dalle_pytorch import DiscreteVAE

train_path, val_path, minutes, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
BATCH = 8  # train_vae.py's BATCH_SIZE
torch.manual_seed(0)
torch.set_num_threads(threads)
train = torch.from_numpy(np.load(train_path))  # (N, 64, 64, 3) uint8
val = torch.from_numpy(np.load(val_path))
vae = DiscreteVAE(image_size=64, num_layers=2, num_tokens=512, codebook_dim=256, hidden_dim=64, num_resnet_blocks=1)
opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
steps, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < minutes * 60:
    for idx in torch.randperm(len(train)).split(BATCH):
        x = train[idx].permute(0, 3, 1, 2).float() / 255
        loss = vae(x, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if time.perf_counter() - t0 >= minutes * 60:
            break
sq, n = 0.0, 0
with torch.no_grad():
    for chunk in val.split(64):
        x = chunk.permute(0, 3, 1, 2).float() / 255
        recon = (vae.decode(vae.get_codebook_indices(x)) * 0.5 + 0.5).clamp(0, 1)
        sq += ((recon - x) ** 2).sum().item()
        n += x.numel()
mse = sq / n
params = sum(p.numel() for p in vae.parameters())
print(json.dumps({"steps": steps, "val_mse": mse, "val_psnr": 10 * math.log10(1 / mse), "params": params}))
