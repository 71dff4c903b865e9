"""Published settings of the bottleneck-adapter methods (Houlsby, AdaptFormer, Adapter+, Convpass).

Read from the official repositories (source: code); task keys are those of
``vpt_jax.data.vtab_tasks.TASKS``, rows in ``VTAB_TASKS`` order:

* OSU-MLB/ViT_PEFT_Vision (Mai et al. 2024) re-tuned every method on VTAB-1k
  under one protocol: per-method grids (``experiment/config/method/<name>.yml``)
  beside lr {1e-3, 1e-2} x wd {1e-4, 1e-3} (``lr_wd_vtab_processed.yml``), batch
  64, torch AdamW, 100 epochs with 10 warmup; each task's chosen setting and its
  single-seed test top-1 are in
  ``tune_output/default_vtab/processed_vtab/<task>/<name>/final_result.json``.
  Its ``rand_h_adapter`` is our ``houlsby``.
* JieShibo/PETL-ViT ``convpass/vtab/configs/convpass/<task>.yaml``: Convpass's
  own per-task scale s and conv init (d = 8, lr 1e-3, wd 1e-4, batch 64).
* visinf/adapter_plus ``conf/experiment/vtab/adapter_plus_dim1-32.yaml``:
  Adapter+'s per-task bottleneck (lr 1e-3, wd 1e-4, batch 64; no per-task
  lr or scale tuning).
"""

from __future__ import annotations

VTAB_TASKS = ("cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet",
              "svhn", "sun397", "patch_camelyon", "eurosat", "resisc45",
              "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti_dist",
              "dsprites_loc", "dsprites_ori", "smallnorb_azim", "smallnorb_elev")
# VTAB-1k's groups, as slices of VTAB_TASKS: natural, specialized, structured.
VTAB_GROUPS = {"natural": slice(0, 7), "specialized": slice(7, 11), "structured": slice(11, 19)}

OSU_SOURCE = "code: OSU-MLB/ViT_PEFT_Vision experiment/config, tune_output/default_vtab"
OSU_GRIDS = {
    "houlsby": dict(bottleneck=(4, 8, 16, 32), scale=(0.01, 0.1, 1.0, 10.0)),
    "adaptformer": dict(bottleneck=(4, 16, 32), scale=(0.05, 0.1, 0.2)),
    "convpass": dict(bottleneck=(8, 16), scale=(0.01, 0.1, 1.0, 10.0, 100.0),
                     conv_init=("xavier", "identity")),
}
# The lrs at batch 64, i.e. base lrs (scaled by batch / 256 at run time) 4x these;
# descending, the protocol's visiting order.
OSU_LRS = (1e-2, 1e-3)
OSU_BASE_LRS = (4e-2, 4e-3)
OSU_WEIGHT_DECAYS = (1e-3, 1e-4)
# Adapter+ trains every task with one setting: lr 1e-3 at batch 64, wd 1e-4.
ADAPTER_PLUS_BASE_LRS, ADAPTER_PLUS_WEIGHT_DECAYS = (4e-3,), (1e-4,)

# Each task's chosen setting: the method's own fields, then lr, wd, top-1 (%).
OSU_FIELDS = {"houlsby": ("bottleneck", "scale"), "adaptformer": ("bottleneck", "scale"),
              "convpass": ("bottleneck", "scale", "conv_init")}
_OSU_ROWS = {}
_OSU_ROWS['houlsby'] = (
    (8, 0.01, 0.001, 0.0001, 72.33),  # cifar100
    (8, 1.0, 0.001, 0.0001, 92.07),  # caltech101
    (8, 0.01, 0.01, 0.001, 71.28),  # dtd
    (32, 10.0, 0.001, 0.001, 97.97),  # oxford_flowers102
    (8, 0.01, 0.001, 0.0001, 91.36),  # oxford_iiit_pet
    (8, 10.0, 0.001, 0.0001, 89.84),  # svhn
    (32, 0.01, 0.01, 0.0001, 54.61),  # sun397
    (32, 1.0, 0.001, 0.001, 87.74),  # patch_camelyon
    (32, 0.1, 0.01, 0.0001, 95.22),  # eurosat
    (16, 0.1, 0.01, 0.001, 86.48),  # resisc45
    (8, 0.01, 0.001, 0.001, 72.98),  # diabetic_retinopathy
    (8, 0.1, 0.001, 0.0001, 82.48),  # clevr_count
    (16, 0.1, 0.001, 0.001, 63.34),  # clevr_dist
    (16, 0.01, 0.01, 0.001, 53.6),  # dmlab
    (32, 0.1, 0.001, 0.001, 79.32),  # kitti_dist
    (4, 1.0, 0.001, 0.001, 83.81),  # dsprites_loc
    (32, 1.0, 0.01, 0.001, 54.17),  # dsprites_ori
    (32, 10.0, 0.001, 0.0001, 34.19),  # smallnorb_azim
    (32, 0.1, 0.001, 0.001, 43.84),  # smallnorb_elev
)
_OSU_ROWS['adaptformer'] = (
    (16, 0.05, 0.001, 0.001, 74.25),  # cifar100
    (32, 0.05, 0.01, 0.0001, 91.3),  # caltech101
    (32, 0.1, 0.01, 0.001, 70.0),  # dtd
    (16, 0.2, 0.01, 0.0001, 99.07),  # oxford_flowers102
    (4, 0.05, 0.001, 0.0001, 91.5),  # oxford_iiit_pet
    (32, 0.2, 0.01, 0.0001, 89.37),  # svhn
    (16, 0.1, 0.01, 0.001, 55.15),  # sun397
    (16, 0.1, 0.001, 0.0001, 86.39),  # patch_camelyon
    (32, 0.2, 0.01, 0.001, 94.89),  # eurosat
    (16, 0.2, 0.01, 0.0001, 86.43),  # resisc45
    (32, 0.05, 0.01, 0.001, 73.52),  # diabetic_retinopathy
    (32, 0.1, 0.001, 0.0001, 82.78),  # clevr_count
    (16, 0.2, 0.001, 0.0001, 62.85),  # clevr_dist
    (32, 0.1, 0.001, 0.001, 52.47),  # dmlab
    (32, 0.2, 0.001, 0.0001, 79.61),  # kitti_dist
    (32, 0.05, 0.01, 0.001, 84.18),  # dsprites_loc
    (32, 0.2, 0.01, 0.0001, 52.89),  # dsprites_ori
    (16, 0.1, 0.01, 0.0001, 32.77),  # smallnorb_azim
    (32, 0.1, 0.001, 0.0001, 41.2),  # smallnorb_elev
)
_OSU_ROWS['convpass'] = (
    (8, 0.1, "identity", 0.01, 0.001, 72.31),  # cifar100
    (16, 0.1, "identity", 0.01, 0.001, 91.3),  # caltech101
    (8, 1.0, "identity", 0.01, 0.001, 70.96),  # dtd
    (8, 0.1, "identity", 0.01, 0.0001, 99.12),  # oxford_flowers102
    (8, 0.01, "identity", 0.01, 0.0001, 90.76),  # oxford_iiit_pet
    (8, 10.0, "identity", 0.01, 0.001, 90.74),  # svhn
    (16, 0.1, "xavier", 0.01, 0.001, 55.76),  # sun397
    (8, 0.01, "identity", 0.01, 0.0001, 86.35),  # patch_camelyon
    (8, 1.0, "identity", 0.01, 0.0001, 95.7),  # eurosat
    (16, 1.0, "identity", 0.001, 0.001, 85.73),  # resisc45
    (16, 10.0, "xavier", 0.001, 0.0001, 72.81),  # diabetic_retinopathy
    (16, 0.1, "identity", 0.001, 0.0001, 82.24),  # clevr_count
    (8, 0.1, "xavier", 0.001, 0.0001, 65.2),  # clevr_dist
    (16, 0.01, "identity", 0.01, 0.0001, 53.74),  # dmlab
    (16, 100.0, "xavier", 0.001, 0.0001, 73.56),  # kitti_dist
    (8, 10.0, "xavier", 0.001, 0.001, 86.1),  # dsprites_loc
    (8, 0.01, "identity", 0.01, 0.0001, 55.03),  # dsprites_ori
    (16, 100.0, "xavier", 0.001, 0.001, 38.44),  # smallnorb_azim
    (16, 1.0, "xavier", 0.001, 0.0001, 44.46),  # smallnorb_elev
)

# PETL-ViT's Convpass configs: (scale s, conv_init) per task (d = 8 always).
CONVPASS_SOURCE = "code: JieShibo/PETL-ViT convpass/vtab/configs/convpass/<task>.yaml"
CONVPASS_OFFICIAL = dict(zip(VTAB_TASKS, (
    (0.1, "identity"), (1.0, "identity"), (0.01, "xavier"), (0.1, "xavier"), (1.0, "xavier"),
    (100.0, "xavier"), (0.1, "identity"), (10.0, "identity"), (10.0, "identity"),
    (10.0, "identity"), (1.0, "identity"), (1.0, "identity"), (0.1, "xavier"),
    (10.0, "identity"), (10.0, "xavier"), (100.0, "xavier"), (0.1, "xavier"),
    (100.0, "xavier"), (1.0, "xavier"))))

# Adapter+ "dim 1-32": the bottleneck per task.
ADAPTER_PLUS_SOURCE = "code: visinf/adapter_plus conf/experiment/vtab/adapter_plus_dim1-32.yaml"
ADAPTER_PLUS_BOTTLENECKS = dict(zip(VTAB_TASKS, (
    1, 4, 2, 1, 8, 16, 1, 16, 2, 32, 32, 4, 8, 8, 8, 32, 4, 32, 8)))


def osu_setting(method: str, task: str) -> dict:
  """OSU's chosen setting of ``method`` on VTAB ``task``: its fields, lr, wd, top1."""
  row = _OSU_ROWS[method][VTAB_TASKS.index(task)]
  return dict(zip(OSU_FIELDS[method] + ("lr", "weight_decay", "top1"), row))


def osu_mean_of_group_means(method: str) -> float:
  """OSU's VTAB-1k summary of ``method``: the mean over the three group means."""
  top1 = [row[-1] for row in _OSU_ROWS[method]]
  groups = [top1[part] for part in VTAB_GROUPS.values()]
  return sum(sum(group) / len(group) for group in groups) / len(groups)
