"""DRFL: Dual-stream Representation Fusion Learning (Xu et al., EAAI 2023).

Stages (`config.stage`; `configs/pipeline_drfl.py` chains them):
  - `teacher` (Sec. 3.1.2): a small SR network trained on 1/2-downsampled training images
    against the originals (eq. 4); its 2x outputs of every training image are cached as
    the SR stream's targets (`drfl_parts.teacher`);
  - `train` (Sec. 3, eq. 1-7): the DRFL network (shared encoder with PFAM, segmentation
    and SR decoders, RFTM, Fusion Module; `models.drfl.DRFL`) or, with `model.arch=unet`,
    the plain U-Net baseline; switches give the ablation ladder of Tables 5-8
    (`drfl_parts.train`);
  - `table`: the ladder's Dice / IoU / pixel accuracy / GFLOPs from finished `train` runs
    (`drfl_parts.table`).
"""
from __future__ import annotations

STAGES = {"teacher": "drfl_parts.teacher:TeacherStage",
          "train": "drfl_parts.train:DRFLStage",
          "table": "drfl_parts.table:LadderTable"}
