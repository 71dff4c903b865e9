"""Per-task hyper-parameters and published numbers we know, with their sources.

The original per-task tables were released as external CSV files whose links
are dead (KMnP/vpt #70, #74, #75, #76), so what survives is kept here as data.
Every entry names where it comes from and how sure we are:

* "code": read from the official repository (configs, demo notebook outputs).
* "issue": quoted by a maintainer or user in a GitHub issue from the CSV.
* "recalled": the paper's tables as recalled in ../shared/reference/vpt.md,
  NOT checked against the PDF. Use for orientation, never as a test target.

Task keys are those of ``vpt_jax.data.vtab_tasks.TASKS`` and ``vpt_jax.data.fgvc``.
"""

from __future__ import annotations

from vpt_jax.protocol import adapter_hparams

# ----------------------------------------------------------------- grids (vpt.md 5.4)
# tune_vtab.py: get_lrwd_range. Base learning rates (scaled by batch / 256 at
# run time), visited in this order (descending), weight decays likewise.
VTAB_LR_GRIDS = {
    "prompt": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05),
    "prompt_largerlr": (1000.0, 500.0, 250.0, 100.0),
    "linear": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05),
    "finetune": (0.005, 0.001, 0.0005, 0.0001),
}
# tune_fgvc.py: the prompt grid without 0.05.
FGVC_LR_GRIDS = {
    "prompt": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1),
    "linear": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05),
    "finetune": (0.005, 0.001, 0.0005, 0.0001),
}
WEIGHT_DECAY_GRID = (0.01, 0.001, 0.0001, 0.0)
# Which reference grid each of our methods uses (its --train-type). Methods
# not listed: "prompt" if they train with SGD, "finetune" with AdamW.
METHOD_GRID = {"vpt_deep": "prompt", "vpt_shallow": "prompt", "linear": "linear",
               "full": "finetune"}
# The bottleneck adapters' own protocols (adapter_hparams; AdaptFormer keeps the
# SGD grid of its official optimizer): lr grid kind and weight decays per method.
METHOD_GRID.update(houlsby="osu", convpass="osu", adapter_plus="adapter_plus")
for _grids in (VTAB_LR_GRIDS, FGVC_LR_GRIDS):  # OSU tuned VTAB only; FGVC reuses it
  _grids.update(osu=adapter_hparams.OSU_BASE_LRS,
                adapter_plus=adapter_hparams.ADAPTER_PLUS_BASE_LRS)
METHOD_WEIGHT_DECAYS = {"houlsby": adapter_hparams.OSU_WEIGHT_DECAYS,
                        "convpass": adapter_hparams.OSU_WEIGHT_DECAYS,
                        "adapter_plus": adapter_hparams.ADAPTER_PLUS_WEIGHT_DECAYS}
# The final runs' seeds (tune_vtab.py) and the reported statistic: test top-1
# at the last epoch, mean and population std (ddof=0) over the seeds (this
# reproduces demo.ipynb's 46.62 +- 0.47 for DMLab).
FINAL_SEEDS = (42, 44, 82, 100, 800)

# ----------------------------------------------------------------- VPT per task
# VPT-deep prompt lengths on VTAB-1k (vpt.md 6). "recalled" unless corroborated.
VPT_DEEP_PROMPTS = {
    "cifar100": (10, "recalled"), "caltech101": (10, "recalled"), "dtd": (10, "recalled"),
    "oxford_flowers102": (1, "recalled"), "oxford_iiit_pet": (1, "recalled"),
    "svhn": (50, "issue: KMnP/vpt #42 (from the CSV)"), "sun397": (5, "code: demo.ipynb"),
    "patch_camelyon": (100, "recalled"), "eurosat": (100, "code: demo.ipynb"),
    "resisc45": (10, "recalled"), "diabetic_retinopathy": (1, "recalled"),
    "clevr_count": (50, "recalled"), "clevr_dist": (200, "recalled"),
    "dmlab": (100, "code: demo.ipynb"), "kitti_dist": (100, "recalled"),
    "dsprites_loc": (100, "recalled"), "dsprites_ori": (100, "recalled"),
    "smallnorb_azim": (200, "recalled"), "smallnorb_elev": (200, "recalled"),
}

# Complete VPT-deep settings visible in the repository or its issues (vpt.md
# 5.4): prompts, prompt dropout, batch, base lr (the scaled lr is base * batch
# / 256), weight decay.
VPT_DEEP_KNOWN = {
    "dmlab": dict(num_prompts=100, dropout=0.1, batch_size=64, base_lr=1.0,
                  weight_decay=1e-3, source="code: demo.ipynb (KMnP/vpt #4 notes the "
                                            "CSV differs)"),
    "sun397": dict(num_prompts=5, dropout=0.1, batch_size=128, base_lr=25.0,
                   weight_decay=1e-4, source="code: demo.ipynb"),
    "eurosat": dict(num_prompts=100, dropout=0.1, batch_size=64, base_lr=1.0,
                    weight_decay=1e-3, source="code: demo.ipynb"),
    "svhn": dict(num_prompts=50, dropout=0.1, batch_size=128, base_lr=2.5,
                 weight_decay=0.0, source="issue: KMnP/vpt #42 (from the CSV)"),
}

# demo.ipynb's final runs (VPT-deep, ViT-B/16 IN-21k), test top-1 at the last
# epoch for seeds 42, 44, 82, 100, 800. Source: code (notebook output).
VPT_DEMO_RESULTS = {
    "dmlab": (46.88, 46.25, 46.14, 47.41, 46.44),
    "eurosat": (96.00, 96.54, 96.67, 95.41, 96.11),
    "sun397": (52.57, 49.03, 52.45, 51.08, 52.72),
}

# FGVC settings in VPT's YAML files (examples, not per-task optima; vpt.md 5.4).
VPT_FGVC_YAML = {
    "prompt": {"cub": (0.1, 0.01), "nabirds": (0.1, 0.01), "oxford_flowers": (0.001, 1e-4),
               "stanford_dogs": (0.001, 1e-4), "stanford_cars": (0.001, 1e-4)},
}

# ----------------------------------------------------------------- CVPT per task
# CVPT's official per-task configs (cvpt.md 1.8; source: code). Only the prompt
# count m, lr and seed are read by its train.py (wd 0.05 and batch 32 always).
# HEAD is the May-2025 revision, v1 the Aug-2024 initial commit. The CIFAR row
# was run in the VPT code base.
CVPT_SOURCE = "code: CVPT configs/<task>.yaml (cvpt.md 1.8)"
CVPT_HEAD = {
    "cifar100": dict(num_prompts=10, lr=1e-3, seed=44),
    "caltech101": dict(num_prompts=200, lr=1e-3, seed=800),
    "dtd": dict(num_prompts=10, lr=1e-3, seed=80),
    "oxford_flowers102": dict(num_prompts=5, lr=2e-3, seed=44),
    "oxford_iiit_pet": dict(num_prompts=5, lr=1e-3, seed=44),
    "svhn": dict(num_prompts=5, lr=1e-2, seed=800),
    "sun397": dict(num_prompts=10, lr=2e-3, seed=80),
    "patch_camelyon": dict(num_prompts=1, lr=1e-2, seed=800),
    "eurosat": dict(num_prompts=5, lr=5e-3, seed=800),
    "resisc45": dict(num_prompts=10, lr=5e-3, seed=800),
    "diabetic_retinopathy": dict(num_prompts=5, lr=5e-3, seed=42),
    "clevr_count": dict(num_prompts=20, lr=1e-3, seed=42),
    "clevr_dist": dict(num_prompts=50, lr=1e-3, seed=80),
    "dmlab": dict(num_prompts=200, lr=2e-3, seed=44),
    "kitti_dist": dict(num_prompts=20, lr=5e-3, seed=44),
    "dsprites_loc": dict(num_prompts=20, lr=5e-3, seed=42),
    "dsprites_ori": dict(num_prompts=5, lr=5e-3, seed=800),
    "smallnorb_azim": dict(num_prompts=50, lr=5e-3, seed=44),
    "smallnorb_elev": dict(num_prompts=50, lr=1e-3, seed=44),
    "cub": dict(num_prompts=5, lr=5e-4, seed=80),
    "nabirds": dict(num_prompts=200, lr=2e-4, seed=42),
    "oxford_flowers": dict(num_prompts=5, lr=1e-3, seed=42),
    "stanford_dogs": dict(num_prompts=10, lr=2e-4, seed=800),
    "stanford_cars": dict(num_prompts=100, lr=2e-3, seed=100),
}
CVPT_V1 = {
    "cifar100": dict(num_prompts=10, lr=1e-3, seed=44),
    "caltech101": dict(num_prompts=5, lr=1e-2, seed=44),
    "dtd": dict(num_prompts=20, lr=1e-3, seed=80),
    "oxford_flowers102": dict(num_prompts=20, lr=2e-3, seed=80),
    "oxford_iiit_pet": dict(num_prompts=5, lr=1e-3, seed=44),
    "svhn": dict(num_prompts=10, lr=1e-2, seed=80),
    "sun397": dict(num_prompts=10, lr=2e-3, seed=100),
    "patch_camelyon": dict(num_prompts=1, lr=1e-2, seed=80),
    "eurosat": dict(num_prompts=10, lr=1e-3, seed=100),
    "resisc45": dict(num_prompts=5, lr=1e-2, seed=800),
    "diabetic_retinopathy": dict(num_prompts=5, lr=2e-3, seed=42),
    "clevr_count": dict(num_prompts=10, lr=1e-3, seed=44),
    "clevr_dist": dict(num_prompts=5, lr=1e-3, seed=800),
    "dmlab": dict(num_prompts=10, lr=5e-3, seed=800),
    "kitti_dist": dict(num_prompts=20, lr=2e-3, seed=44),
    "dsprites_loc": dict(num_prompts=20, lr=5e-3, seed=42),
    "dsprites_ori": dict(num_prompts=20, lr=5e-3, seed=800),
    "smallnorb_azim": dict(num_prompts=20, lr=5e-3, seed=80),
    "smallnorb_elev": dict(num_prompts=10, lr=1e-3, seed=42),
}

# ----------------------------------------------------------------- published numbers
# VPT paper, ViT-B/16 IN-21k, test top-1 (%). "recalled" (vpt.md 6): NOT
# verified against the PDF; shown beside our numbers, never used as a target.
PAPER_SOURCE = "VPT paper Table 1 / appendix, recalled in vpt.md 6 (unverified)"
_VTAB_ORDER = adapter_hparams.VTAB_TASKS  # the 19 tasks in the papers' table order
_VTAB_ROWS = {
    "full": (68.9, 87.7, 64.3, 97.2, 86.9, 87.4, 38.8, 79.7, 95.7, 84.2, 73.9,
             56.3, 58.6, 41.7, 65.5, 57.5, 46.7, 25.7, 29.1),
    "linear": (63.4, 85.0, 63.2, 97.0, 86.3, 36.6, 51.0, 78.5, 87.5, 68.6, 74.0,
               34.3, 30.6, 33.2, 55.4, 12.5, 20.0, 9.6, 19.2),
    "vpt_shallow": (77.7, 86.9, 62.6, 97.5, 87.3, 74.5, 51.2, 78.2, 92.0, 75.6, 72.9,
                    50.5, 58.6, 40.5, 67.1, 68.7, 36.1, 20.2, 34.1),
    "vpt_deep": (78.8, 90.8, 65.8, 98.0, 88.3, 78.1, 49.6, 81.8, 96.1, 83.4, 68.4,
                 68.5, 60.0, 46.5, 72.8, 73.6, 47.9, 32.9, 37.8),
}
_FGVC_ORDER = ("cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars")
_FGVC_ROWS = {
    "full": (87.3, 82.7, 98.8, 89.4, 84.5),
    "linear": (85.3, 75.9, 97.9, 86.2, 51.3),
    "vpt_shallow": (86.7, 78.8, 98.4, 90.7, 68.7),
    "vpt_deep": (88.5, 84.2, 99.0, 90.2, 83.6),
}
# {method: {task: top-1 %}}; FGVC tasks are keyed "fgvc/<name>", VTAB "vtab/<name>".
PAPER_RESULTS = {
    method: {**{f"vtab/{t}": v for t, v in zip(_VTAB_ORDER, _VTAB_ROWS[method])},
             **{f"fgvc/{t}": v for t, v in zip(_FGVC_ORDER, _FGVC_ROWS[method])}}
    for method in _VTAB_ROWS
}


def lr_grid(method: str, optimizer: str, benchmark: str = "vtab") -> tuple[float, ...]:
  """The reference's base-lr grid for a method (by its optimizer if unlisted)."""
  kind = METHOD_GRID.get(method, "finetune" if optimizer == "adamw" else "prompt")
  grids = FGVC_LR_GRIDS if benchmark == "fgvc" else VTAB_LR_GRIDS
  return grids[kind]


def weight_decay_grid(method: str) -> tuple[float, ...]:
  """The weight decays a method's protocol visits (the reference's unless listed)."""
  return METHOD_WEIGHT_DECAYS.get(method, WEIGHT_DECAY_GRID)


def vpt_deep_prompts(task: str) -> int:
  """VPT-deep's prompt length for a VTAB task key (0 if unknown)."""
  return VPT_DEEP_PROMPTS.get(task, (0, ""))[0]


# ------------------------------------- re-parameterisable methods (issue 13), "code"
# Task order of the rows below: _VTAB_ORDER.
def _per_task(values) -> dict:
  return dict(zip(_VTAB_ORDER, values))


# JieShibo/PETL-ViT FacT/configs/{tt,tk}/<task>.yaml: (rank, scale s); AdamW lr 1e-3,
# wd 1e-4, batch 64, 100 epochs (10 warmup), drop path 0.1 (fact_tt.py / fact_tk.py).
FACT_SOURCE = "code: JieShibo/PETL-ViT FacT/configs/{tt,tk}/<task>.yaml"
FACT_TASKS = {
    "fact_tt": _per_task(((8, 1.0), (16, 10.0), (8, 0.01), (16, 1.0), (8, 1.0), (16, 100.0),
                          (8, 1.0), (8, 10.0), (8, 100.0), (8, 0.1), (8, 1.0), (16, 1.0),
                          (4, 10.0), (16, 10.0), (16, 10.0), (16, 100.0), (16, 1.0),
                          (16, 100.0), (8, 10.0))),
    "fact_tk": _per_task(((32, 0.1), (32, 10.0), (16, 0.01), (32, 1.0), (16, 10.0),
                          (32, 100.0), (16, 1.0), (32, 10.0), (32, 100.0), (32, 10.0),
                          (16, 1.0), (32, 10.0), (16, 10.0), (32, 10.0), (32, 10.0),
                          (32, 100.0), (32, 1.0), (32, 100.0), (16, 10.0))),
}
# luogen1996/RepAdapter configs/repblock/<task>.yaml: scale s (dim 8, groups 2; lr
# 1e-3, wd 1e-4, batch 64, drop path 0.1, train.py); search grid scripts/search_repblock.sh.
REPADAPTER_SOURCE = "code: luogen1996/RepAdapter configs/repblock/<task>.yaml"
REPADAPTER_SCALES = _per_task((0.1, 5, 1, 0.5, 0.1, 10, 0.1, 1, 1, 5, 0.1, 0.5, 0.1, 5, 5,
                               5, 0.1, 10, 1))
# dongzelian/SSF train_scripts/vit/vtab/<task>/train_ssf.sh: (lr, weight decay);
# AdamW, batch 32, 100 epochs, 10 warmup, drop path 0.1, no augmentation.
SSF_SOURCE = "code: dongzelian/SSF train_scripts/vit/vtab/<task>/train_ssf.sh"
SSF_TASKS = _per_task(((5e-3, 5e-5), (1e-3, 5e-2), (5e-3, 5e-5), (5e-3, 5e-5), (5e-3, 5e-5),
                       (1e-2, 5e-5), (5e-3, 5e-5), (5e-3, 5e-5), (3e-3, 5e-2), (2e-3, 5e-5),
                       (5e-3, 5e-5), (2e-3, 5e-2), (5e-2, 5e-2), (5e-3, 5e-5), (1e-2, 5e-5),
                       (1e-2, 5e-5), (5e-3, 5e-5), (2e-2, 5e-5), (5e-3, 5e-2)))
# The protocol's grid for these methods: OSU's lrs as base lrs (the "osu" grid,
# adapter_hparams.OSU_BASE_LRS), with the shared WEIGHT_DECAY_GRID.
METHOD_GRID.update(dict.fromkeys(
    ("ssf", "difffit", "ln_tune", "fact_tt", "fact_tk", "repadapter"), "osu"))
# OSU-MLB/ViT_PEFT_Vision experiment/config/method/<name>.yml: per-method grids
# (its lr x wd grid: adapter_hparams.OSU_LRS x OSU_WEIGHT_DECAYS).
OSU_GRIDS = {
    "fact_tt": {"rank": (8, 16, 32), "scale": (0.01, 0.1, 1.0, 10.0, 100.0)},
    "fact_tk": {"rank": (16, 32, 64), "scale": (0.01, 0.1, 1.0, 10.0, 100.0)},
    "repadapter": {"dim": (8, 16, 32), "scale": (0.1, 0.5, 1.0, 5.0, 10.0)},
}
