"""The bottleneck adapters' published settings (protocol/adapter_hparams.py) and their grids."""

import pytest

import protocol_fixtures
from vpt_jax.data import vtab_tasks
from vpt_jax.protocol import adapter_hparams as tables
from vpt_jax.protocol import run_plan


# Mai et al.'s (OSU ViT_PEFT_Vision) VTAB-1k summary, mean of the group means, as
# issue 13 quotes it: recomputed from the 19 per-task rows, they must agree.
@pytest.mark.parametrize("method, summary", [
    ("convpass", 76.35), ("houlsby", 76.27), ("adaptformer", 75.97)])
def test_osu_rows_reproduce_the_published_summary(method, summary):
  assert tables.osu_mean_of_group_means(method) == pytest.approx(summary, abs=0.005)


def test_every_table_covers_the_vtab_tasks_within_its_grid():
  assert set(tables.VTAB_TASKS) <= set(vtab_tasks.TASKS) and len(tables.VTAB_TASKS) == 19
  for method, grid in tables.OSU_GRIDS.items():
    for task in tables.VTAB_TASKS:
      setting = tables.osu_setting(method, task)
      assert all(setting[field] in grid[field] for field in grid), (method, task)
      assert setting["lr"] in tables.OSU_LRS
      assert setting["weight_decay"] in tables.OSU_WEIGHT_DECAYS
  assert set(tables.CONVPASS_OFFICIAL) == set(tables.ADAPTER_PLUS_BOTTLENECKS) == set(
      tables.VTAB_TASKS)
  assert tables.osu_setting("convpass", "kitti_dist") == dict(
      bottleneck=16, scale=100.0, conv_init="xavier", lr=1e-3, weight_decay=1e-4, top1=73.56)


@pytest.mark.parametrize("method, expected", [
    # lr 1e-2, 1e-3 at batch 64 = base lrs 4e-2, 4e-3; wd 1e-3, 1e-4.
    ("houlsby", ((0.04, 0.004), (0.001, 0.0001))),
    ("convpass", ((0.04, 0.004), (0.001, 0.0001))),
    ("adapter_plus", ((0.004,), (0.0001,)))])
def test_protocol_grids_are_the_official_ones(method, expected):
  config = protocol_fixtures.protocol_config(f"method={method},tasks=dmlab")
  assert run_plan.grid(config, "vtab/dmlab") == expected
  assert config.optim.batch_size == 64  # the grids' lrs are at batch 64
