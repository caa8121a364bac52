"""DSDM / DiffusionDCI (paper 004): a dual semantic diffusion model, then segmentation.

Stages, chosen by `config.stage`:
  - `ref_encoder`: the reference encoder, a ResNet-18 pretrained by this library's SimCLR
    (the camcontrast pretrain stage with the `nt_xent` objective on whole images);
  - `generator`: ε_θ(x_t, t, mask, ref) with SPADE and MCAA, the hybrid loss and
    classifier-free guidance (Sec. IV-B, eq. 10-17), evaluated by FD/KID and diversity;
  - `sample`: K images per mask in a reference's style, an image+mask dataset;
  - `filter`: the `ldm` automatic curation on those pairs (the paper's clinicians);
  - `seg`: the GroupNorm U-Net initialized from the DSDM, fed by the frozen DSDM's
    decoder features through CAA (Sec. IV-C2), on real + a fraction of synthetic data;
  - `probe`: pixel probes over decoder blocks x timesteps (Fig. 3);
  - `table`: Table 1/2-, 5- and Fig. 6-shaped tables from finished runs.
"""
from __future__ import annotations

STAGES = {"ref_encoder": "camcontrast_parts.pretrain_stage:PretrainStage",
          "generator": "dsdm_parts.generator:GeneratorStage",
          "sample": "dsdm_parts.sample:SampleStage",
          "filter": "dsdm_parts.filter:FilterStage",
          "seg": "dsdm_parts.seg:SegStage",
          "probe": "dsdm_parts.probe:ProbeStage",
          "table": "dsdm_parts.table:TableStage"}
