"""Bad input fails before compute, with an error that names the problem and the fix.

Issue 5's list of bad inputs, and where each case is tested:

* unknown method: test_end_to_end.py::test_bad_input_fails_before_compute[method],
  test_registry.py::test_bad_method_names_are_refused (closest names)
* unknown task: test_vtab.py::test_unknown_task_names_the_close_ones (VTAB
  registry); here test_unknown_task_names_the_closest_ones (VTAB, FGVC, task
  kind, through the trainer)
* unknown variant: test_end_to_end.py::test_bad_input_fails_before_compute[variant];
  here test_unknown_variant_names_the_closest_ones
* unknown config key: test_cli.py::test_misspelt_config_key_is_refused (run.py),
  test_cli.py::test_bad_config_arguments_name_the_closest_valid_key
* prompt count below 1: test_end_to_end.py::test_bad_input_fails_before_compute[num_prompts];
  num_prompts=0 given to a config file (no longer the method's default):
  test_config_checks.py::test_num_prompts_zero_is_refused_and_only_an_absent_count_takes_the_default
* image size not divisible by the patch size:
  test_end_to_end.py::test_bad_input_fails_before_compute[image_size]
* number of classes inconsistent with the dataset:
  test_end_to_end.py::test_bad_input_fails_before_compute[num_classes] (TFDS),
  test_data_formats.py::test_image_folder_split_layout_shares_class_ids (folders),
  test_data_formats.py::test_vtab1k_folder_errors_name_the_file (label out of range)
* backbone checkpoint empty without --config.model.from_scratch=True (VPT on a random frozen
  backbone; full fine-tuning from scratch), and from_scratch with a checkpoint:
  test_config_checks.py::test_bad_values_are_refused_before_compute[vpt_without_backbone],
  [full_without_backbone], [scratch_with_backbone]; test_training_from_scratch_must_be_asked_for
* checkpoint missing: test_end_to_end.py::test_bad_input_fails_before_compute[init_checkpoint],
  test_npz.py::test_missing_file; here the side-network file
  (test_missing_side_network_checkpoint_fails_before_compute), and one given to
  another method (test_side_network_checkpoint_with_another_method_is_refused)
* checkpoint truncated, not an npz, missing / extra / misshapen keys:
  test_npz.py::test_truncated_file, test_not_an_npz, test_damaged_member,
  test_merge.py::test_missing_key_is_named_in_model_terms, test_unexpected_key,
  test_misshapen_key_lists_both_shapes, test_all_problems_reported_at_once_sorted;
  here test_broken_backbone_file_fails_before_anything_is_compiled (through the
  trainer, before the model is initialised)
* task export applied to a different backbone or method:
  test_end_to_end.py::test_export_refuses_a_different_backbone_or_method,
  test_task_export.py::test_incomplete_export_is_refused
* NaN or Inf loss: test_end_to_end.py::test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint
* corrupt image in a custom dataset: test_data_formats.py::test_a_corrupt_image_is_named,
  test_data_formats.py::test_skipping_corrupt_images_reports_the_count
* Trustworthy runs, section 2 (every input checked before compute), each in
  test_config_checks.py::test_bad_values_are_refused_before_compute[<case>]:
  learning rate <= 0 [negative_lr], [zero_lr]; weight decay < 0 [negative_weight_decay];
  momentum outside [0, 1) [momentum_one]; batch size, epochs <= 0 (named one by one)
  [zero_batch_size], [zero_epochs]; dropout and drop-path rates outside [0, 1)
  [prompt_dropout_one], [negative_prompt_dropout], [model_dropout], [cvpt_drop_path],
  [e2vpt_kv_dropout], [mlp_dropout]; checkpoint.keep < 1 [keep_zero];
  checkpoint.every_steps < 0 [negative_every_steps]; eval.batch_size < 1 [zero_eval_batch];
  eval.every_epochs < 0 [negative_eval_every]; log_every_steps < 1 [zero_log_every];
  data.num_classes = 1 [one_class_configured]; a trainable rule with a bad label or regex
  [trainable_rule_label], [trainable_rule_regex]
* splits that select nothing, found from the sizes before the first step
  (config_checks.check_data): test_config_checks.py::
  test_splits_that_select_nothing_are_refused_before_compute[empty_test_split] (an empty
  test split), [inverted_slice], [unknown_eval_split], [empty_train_split], and a label or
  image feature the dataset does not have [unknown_label_key]; a dataset with
  one class: test_config_checks.py::test_a_one_class_dataset_is_refused_before_compute
* workdir not writable: here test_unwritable_workdir_fails_before_anything_is_loaded
* dataset that needs a manual download:
  test_vtab.py::test_missing_data_shows_the_manual_download_steps (RESISC45, DMLab),
  test_data_formats.py::test_nabirds_needs_its_split_files,
  test_pipeline.py::test_unprepared_remote_dataset_error_names_the_fix; here
  test_dataset_without_a_builder_says_where_to_put_what (NABirds, through the trainer)
"""

import os
import re

import pytest

import checkpoint_fixtures
import run_fixtures
from run_fixtures import tiny_config
from vpt_jax import errors
from vpt_jax.checkpoints import npz
from vpt_jax.training import config_checks
from vpt_jax.training import trainer


no_model_init = run_fixtures.no_model_init
no_compute = run_fixtures.no_compute


def _unwritable(tmp_path, kind):
  if kind == "below a file":
    (tmp_path / "a_file").write_text("not a directory")
    return str(tmp_path / "a_file" / "run")
  # An existing directory that refuses new files, even to root.
  if not os.path.isdir("/proc"):
    pytest.skip("needs /proc")
  return "/proc"


@pytest.mark.parametrize("kind", ["below a file", "existing read-only directory"])
def test_unwritable_workdir_fails_before_anything_is_loaded(
    backbone, data_dir, tmp_path, no_compute, kind):
  workdir = _unwritable(tmp_path, kind)
  with pytest.raises(config_checks.ConfigError,
                     match=rf"workdir '{re.escape(workdir)}' is not writable .*--workdir"):
    trainer.train_and_evaluate(tiny_config(backbone, data_dir), workdir)


@pytest.mark.parametrize("task, message", [
    ("vtab/clevr_cnt", r"Unknown VTAB task 'clevr_cnt' \(did you mean clevr_count"),
    ("fgvc/stanford_dog", r"Unknown FGVC dataset 'stanford_dog' \(did you mean stanford_dogs"),
    ("vtb/dmlab", r"Unknown data.task 'vtb/dmlab'; use vtab/<task>, fgvc/<dataset>, "
     r"fewshot/<dataset>, folder"),
])
def test_unknown_task_names_the_closest_ones(backbone, data_dir, tmp_path, no_compute, task,
                                             message):
  config = tiny_config(backbone, data_dir, **{"data.task": task})
  with pytest.raises(errors.UserError, match=message):  # one line on the command line
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # refused before the workdir is made


@pytest.mark.parametrize("variant, close", [("b/16", "B/16"), ("L16", "L/16")])
def test_unknown_variant_names_the_closest_ones(backbone, data_dir, tmp_path, no_compute,
                                                variant, close):
  config = tiny_config(backbone, data_dir, **{"model.variant": variant})
  with pytest.raises(errors.UserError, match=rf"Unknown ViT variant '{variant}'.*did you mean .*{close}"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def _truncated(tmp_path, backbone):
  data = open(backbone, "rb").read()
  path = tmp_path / "truncated.npz"
  path.write_bytes(data[:len(data) // 2])
  return str(path), {}


def _text_file(tmp_path, backbone):
  path = tmp_path / "weights.npz"
  path.write_text("<html>404 Not Found</html>")
  return str(path), {}


def _two_blocks_for_four(tmp_path, backbone):
  # The file has 2 blocks; the model asks for 4 ("test4/4").
  return backbone, {"model.variant": "test4/4"}


def _patch_8_for_patch_4(tmp_path, backbone):
  path = checkpoint_fixtures.write_tiny_backbone(tmp_path / "ViT-test_8.npz",
                                                 variant="test/8", image_size=32)
  return path, {}


@pytest.mark.parametrize("make_file, message", [
    (_truncated, r"truncated.npz is not a valid \.npz checkpoint.*Re-download it"),
    (_text_file, r"weights.npz is not a valid \.npz checkpoint: it is not a zip archive"),
    (_two_blocks_for_four, r"(?s)missing from the file \(32\):.*"
                           r"Transformer/encoderblock_2/LayerNorm_0/bias.*wrong variant\?"),
    (_patch_8_for_patch_4, r"embedding/kernel: file \(8, 8, 3, 16\) vs model \(4, 4, 3, 16\)"),
])
def test_broken_backbone_file_fails_before_anything_is_compiled(
    backbone, data_dir, tmp_path, no_model_init, make_file, message):
  path, overrides = make_file(tmp_path, backbone)
  config = tiny_config(backbone, data_dir, **{"model.init_checkpoint": path, **overrides})
  with pytest.raises(npz.CheckpointError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_missing_side_network_checkpoint_fails_before_compute(backbone, data_dir, tmp_path,
                                                              no_compute):
  config = tiny_config(backbone, data_dir, **{"method": "sidetune",
                                              "sidetune.checkpoint": "/nonexistent/side.npz"})
  with pytest.raises(config_checks.ConfigError,
                     match=r"Side-network checkpoint '/nonexistent/side.npz' does not exist.*"
                           r"--config.sidetune.checkpoint=''"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_side_network_checkpoint_with_another_method_is_refused(backbone, data_dir, tmp_path,
                                                                 no_compute):
  side = tmp_path / "side.npz"
  side.write_bytes(b"")  # exists: the method, not the file, is what is wrong
  config = tiny_config(backbone, data_dir, **{"method": "vpt_deep",
                                              "sidetune.checkpoint": str(side)})
  with pytest.raises(config_checks.ConfigError,
                     match=r"only read by method 'sidetune', not 'vpt_deep'.*"
                           r"--config.method=sidetune"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_dataset_without_a_builder_says_where_to_put_what(backbone, data_dir, tmp_path,
                                                          no_compute):
  config = tiny_config(backbone, data_dir, **{"data.task": "fgvc/nabirds"})
  with pytest.raises(config_checks.ConfigError) as error:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  # Where to get it, what goes where, and which setting points at it.
  for part in ("https://dl.allaboutbirds.org/nabirds", "train.json/val.json/test.json next "
               "to images/", "--config.data.path"):
    assert part in message, message


@pytest.mark.parametrize("typo,suggestion", [
    ("resnet50", "resnet-50"), ("convnxt-B", "convnext-B"), ("swim-B/4w7", "swin-B/4w7")])
def test_variant_typos_suggest_the_other_families(typo, suggestion):
  from vpt_jax.models import vit_variants  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match=f"did you mean .*{re.escape(suggestion)}"):
    vit_variants.decode_variant(typo)


def test_a_tfds_dataset_needing_a_manual_download_says_where_to_put_it(tmp_path):
  from vpt_jax.data import source_protocols  # pylint: disable=g-import-not-at-top
  from vpt_jax.data import training_stream  # pylint: disable=g-import-not-at-top
  source = source_protocols.ImageSource(builder="diabetic_retinopathy_detection",
                                        data_dir=str(tmp_path), split="train")
  manual_dir = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(FileNotFoundError, match="needs a manual download") as error:
    training_stream.load_split_arrays(source, image_size=32)
  assert f"Put the files in {manual_dir}" in str(error.value)
  assert "--manual_dir" in str(error.value)
