"""LTDiff++: multiscale latent diffusion for CT kernel standardization (Sadia et al.).

Stages (`config.stage`), in the paper's phases (Sec. III-C):
  - `ae` (phase 1): the UNet++ encoder-decoder with deep supervision (Sec. III-A,
    `models.unetpp`) trained to reconstruct every slice of both kernels, L1 per head
    (`ltdiff_parts.ae`);
  - `latent_ddpm` (phase 2, `ltdiff_parts.latent_ddpm`): with the `ae` run frozen
    (`ae_from`), an ε-prediction DiffusionUNet on cached Z_B latents conditioned on Z_A by
    concatenation (Sec. III-B, DESIGN reading), with EMA; eval: ε-MSE on the val split;
  - `joint` (phase 3, `ltdiff_parts.joint`): the denoiser and the UNet++ decoder fine-tuned
    on ||Z_A' - Z_B||² + λ||D(Z_A') - B||² (Z_A' the one-step x̂_0 from Z_A noised to t < t*);
  - `translate` (`ltdiff_parts.translate`): Z_A noised to t* (SDEdit-style, the paper's
    Z~_A = Z_A + η), the reverse chain conditioned on Z_A (DDPM or DDIM), A' = D(Z_A');
    writes translated/{A,A_prime,B}/*.npy HU slices for `python -m medrep_jax.radiomics`;
  - `direct` (`ltdiff_parts.direct`): the `unetpp_direct` baseline, the UNet++ trained
    A -> B; writes translated/ like `translate`;
  - `latent_ddpm` with `space="pixel"`: the `pixel_ddpm` baseline, the same DDPM on images;
  - `evaluate` (`ltdiff_parts.evaluate`, Sec. IV-B): Lin's CCC per radiomic feature class
    of every translator's A' against B, in the paper's HU windows (Table I).

Data (`ltdiff_parts.data`): (A, B) kernel pairs from `config.data` (simulated by FBP from
real DICOM CT and cached, real kernel folders, or procedural phantoms), HU windowed to
[0, 1].
"""
from __future__ import annotations

STAGES = {"ae": "ltdiff_parts.ae:AEStage",
          "direct": "ltdiff_parts.direct:DirectStage",
          "latent_ddpm": "ltdiff_parts.latent_ddpm:LatentDDPMStage",
          "joint": "ltdiff_parts.joint:JointStage",
          "translate": "ltdiff_parts.translate:TranslateStage",
          "evaluate": "ltdiff_parts.evaluate:EvaluateStage"}
