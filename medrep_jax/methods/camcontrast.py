"""CAMContrast: coarse-to-fine representation learning via class activation maps (Yap & Ng).

Stages, chosen by `config.stage` (configs/camcontrast.py runs them as a pipeline):
  - `classifier` (Sec. 3.1, eq. 1-4): a normal/abnormal classifier, encoder + GAP + linear
    layer, trained with CE + λ·L_attn; its CAMs make the heatmaps;
  - `heatmaps` (Sec. 3.1-3.2): abnormal-class CAMs, min-max normalized at feature-map
    resolution, negative and background suppression, five fixed crops per image, written
    once as the crop dataset;
  - `pretrain` (Sec. 3.2, eq. 5, Algorithm 1): f_I + g_I on augmented image crops against
    f_h + g_h on heatmap crops, NT-Xent with τ = 0.05; the SimCLR, SupCE and SupCon
    baselines (and their "-crop" variants) are configs of the same stage;
  - `linear_eval` (Table 8): logistic-regression probes on frozen features at several
    label fractions.
Segmentation transfer (Table 9) is `finetune` with `init_from` the pretrain stage.
"""
from __future__ import annotations

STAGES = {"classifier": "camcontrast_parts.classifier_stage:ClassifierStage",
          "heatmaps": "camcontrast_parts.heatmap_stage:HeatmapStage",
          "pretrain": "camcontrast_parts.pretrain_stage:PretrainStage",
          "linear_eval": "camcontrast_parts.linear_eval_stage:LinearEvalStage"}
