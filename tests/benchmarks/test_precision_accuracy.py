"""benchmarks/precision_accuracy.py: its method list, suite config and table (no training)."""

from tests import benchmark_scripts


def test_methods_cover_the_registry_but_one_k_per_family():
  bench = benchmark_scripts.load("precision_accuracy")
  methods = bench.all_methods()
  assert {"vpt_deep", "full", "houlsby", "fact_tk", "vqt", "partial-1", "mlp-3"} <= set(methods)
  assert not {"partial-2", "mlp-9"} & set(methods)
  assert len(methods) == len(set(methods)) == 25


def test_suite_config_sets_dtype_epochs_and_one_process():
  suite = benchmark_scripts.load("precision_accuracy").suite_config("bfloat16", 5, ["count"], ["vpt_deep", "houlsby"], seed=7)
  assert (suite.base.model.dtype, suite.base.optim.epochs, suite.base.optim.warmup_epochs,
          suite.base.seed) == ("bfloat16", 5, 0.5, 7)
  assert (suite.workers, suite.task_order, suite.run_order) == (
      1, ("count",), ("vpt_deep", "houlsby"))
  assert not suite.base.export.enabled


def test_table_pairs_the_dtypes_and_reports_the_largest_difference():
  row = lambda method, accuracy, seconds: dict(task="count", method=method, accuracy=accuracy,
                                               seconds=seconds)
  table = benchmark_scripts.load("precision_accuracy").format_table({
      "float32": [row("vpt_deep", 0.750, 30.2), row("full", 0.700, 40.0)],
      "bfloat16": [row("full", 0.690, 41.0), row("vpt_deep", 0.755, 29.6)]})
  assert "| count | vpt_deep | 0.750 | 0.755 | +0.005 | 30 | 30 |" in table
  assert "| count | full | 0.700 | 0.690 | -0.010 | 40 | 41 |" in table
  assert "max |bf16 - f32| 0.010 (count / full); mean |bf16 - f32| 0.0075 over 2 runs" in table
