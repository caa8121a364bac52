"""LTDiff++: multiscale latent diffusion for CT kernel standardization (Sadia et al.).

Stages (`config.stage`), in the paper's phases (Sec. III-C):
  - `ae` (phase 1): the UNet++ encoder-decoder with deep supervision (Sec. III-A,
    `models.unetpp`) trained to reconstruct every slice of both kernels, L1 per head
    (`ltdiff_parts.ae`);
and, to come, with the `ae` run frozen: `latent_ddpm` (phase 2: ε-model on Z_B
conditioned on Z_A by concatenation, Sec. III-B), `joint` (phase 3: ||Z_A' - Z_B||^2 +
λ||D(Z_A') - B||^2), `translate` (Z_A noised to t*, SDEdit-style sampling, decode) and
`evaluate` (Lin's CCC per radiomic feature class within HU windows, Sec. IV-B).

Data (`ltdiff_parts.data`): (A, B) kernel pairs from `config.data` (simulated by FBP from
real DICOM CT and cached, real kernel folders, or procedural phantoms), HU windowed to
[0, 1].
"""
from __future__ import annotations

STAGES = {"ae": "ltdiff_parts.ae:AEStage"}
