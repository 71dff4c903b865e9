"""hf:// references: parsing, the missing-package error, and resolution in a
local cache laid out as the hub's (HF_HUB_OFFLINE=1, no network).

Resolution is huggingface_hub's own, so those tests run only where the
optional package is installed (CI installs requirements.txt only and skips
them); parsing and the missing-package error always run.
"""

from __future__ import annotations

import builtins
import json
import types

import numpy as np
import pytest

import hub_fixtures
import torch_fixtures
from vpt_jax import errors
from vpt_jax.checkpoints import hub
from vpt_jax.checkpoints import torch_files


@pytest.mark.parametrize("reference, parsed", [
    ("hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
     ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", None, "")),
    ("hf://facebook/dinov2-base@v1.0/model.safetensors",
     ("facebook/dinov2-base", "v1.0", "model.safetensors")),
    ("hf://org/repo/sub/dir/model.safetensors", ("org/repo", None, "sub/dir/model.safetensors")),
    ("hf://org/repo@" + "f" * 40, ("org/repo", "f" * 40, "")),
])
def test_parse_reference(reference, parsed):
  assert hub.parse_reference(reference) == parsed


def test_bad_reference_and_local_paths():
  with pytest.raises(errors.UserError, match="hf://<org>/<repo>"):
    hub.parse_reference("hf://just-a-name")
  assert hub.local_path("/tmp/model.safetensors") == "/tmp/model.safetensors"
  assert not hub.is_hub_reference("gs://bucket/model.npz")


def test_missing_package_is_one_line_user_error(monkeypatch):
  real_import = builtins.__import__

  def no_hub(name, *args, **kwargs):
    if name.startswith("huggingface_hub"):
      raise ImportError("No module named 'huggingface_hub'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_hub)
  with pytest.raises(errors.UserError, match="pip install huggingface_hub") as info:
    hub.local_path("hf://timm/vit_small_patch16_224.augreg_in21k")
  assert "\n" not in str(info.value)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  cache = tmp_path / "hub"
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads its environment at import: point its constants here too.
  import huggingface_hub.constants as constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def test_resolves_single_file_and_sharded_index_from_the_cache(offline_cache, tmp_path):
  arrays = {"w": torch_fixtures.rng_array((2, 3)), "b": torch_fixtures.rng_array((3,))}
  single = hub_fixtures.write_state_dict(arrays, tmp_path / "single.safetensors")
  snapshot = hub_fixtures.hub_cache(offline_cache, "timm/tiny", {
      "model.safetensors": single.read_bytes(), "config.json": b"{}"})
  found = hub.local_path("hf://timm/tiny")
  assert found == str(snapshot / "model.safetensors")
  np.testing.assert_array_equal(torch_files.read_state_dict(found)["w"], arrays["w"])
  # A pinned revision (the commit) and an explicit file resolve the same.
  assert hub.local_path("hf://timm/tiny@" + "a" * 40 + "/model.safetensors") == found

  index = hub_fixtures.write_sharded(arrays, tmp_path / "shards", num_shards=2)
  files = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
  hub_fixtures.hub_cache(offline_cache, "facebook/sharded", files, commit="b" * 40)
  found = hub.local_path("hf://facebook/sharded")
  assert found.endswith("model.safetensors.index.json")
  loaded = torch_files.read_state_dict(found)
  np.testing.assert_array_equal(loaded["b"], arrays["b"])
  assert json.loads(index.read_text())["weight_map"].keys() == loaded.keys()


def test_uncached_file_is_named(offline_cache, tmp_path):
  hub_fixtures.hub_cache(offline_cache, "org/empty", {"config.json": b"{}"})
  with pytest.raises(errors.UserError, match=r"found none of model.safetensors.*HF_HUB_OFFLINE"):
    hub.local_path("hf://org/empty")
  files = {"model.safetensors.index.json": json.dumps(
      {"weight_map": {"w": "model-00001-of-00002.safetensors"}}).encode()}
  hub_fixtures.hub_cache(offline_cache, "org/partial", files)
  with pytest.raises(errors.UserError, match=r"shard model-00001-of-00002.safetensors"):
    hub.local_path("hf://org/partial")


def test_a_reference_is_resolved_once_until_its_file_goes(tmp_path, monkeypatch):
  """The config check, the loading and the fingerprint of a run ask the hub once."""
  cached = tmp_path / "model.safetensors"
  cached.write_bytes(b"weights")
  calls = []

  def download(repo_id, filename, revision=None):
    calls.append((repo_id, filename, revision))
    return str(cached)

  fake_errors = types.SimpleNamespace(EntryNotFoundError=KeyError,
                                      LocalEntryNotFoundError=KeyError,
                                      RepositoryNotFoundError=LookupError)
  fake = types.SimpleNamespace(
      hf_hub_download=download, errors=fake_errors,
      constants=types.SimpleNamespace(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE=False))
  monkeypatch.setattr(hub, "_hub", lambda: fake)
  monkeypatch.setattr(hub, "_RESOLVED", {})
  reference = "hf://org/resolve-once"
  assert [hub.local_path(reference) for _ in range(3)] == [str(cached)] * 3
  assert calls == [("org/resolve-once", "model.safetensors", None)]
  fake.constants.HF_HUB_CACHE = str(tmp_path / "other")  # another cache: asked again
  hub.local_path(reference)
  assert len(calls) == 2
  cached.unlink()  # the file went (a cleaned cache): asked again
  hub.local_path(reference)
  assert len(calls) == 3
