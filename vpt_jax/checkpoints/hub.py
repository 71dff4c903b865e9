"""Hugging Face hub references (``hf://org/name[@revision][/file]``) -> local files.

A reference is resolved through ``huggingface_hub`` (an optional dependency:
``pip install huggingface_hub``), so it reads and fills the hub's own cache
(``HF_HUB_CACHE``, laid out as ``models--org--name/snapshots/<commit>/<file>``
with ``refs/<revision>``) and honours ``HF_HUB_OFFLINE=1``: offline, only cached
files resolve. Without a file name the first weight file the repository has
of ``WEIGHT_FILES`` is used; a sharded index (``*.index.json``) brings its
shards along, so the returned index path has them beside it.
"""

from __future__ import annotations

import json
import os
import re

from vpt_jax import errors

__all__ = ["HUB_PREFIX", "WEIGHT_FILES", "is_hub_reference", "parse_reference", "local_path"]

HUB_PREFIX = "hf://"
# Tried in this order when a reference names no file: safetensors first (no
# pickle), a sharded index next, then PyTorch files (timm, transformers, open_clip).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")
_REFERENCE = re.compile(r"hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+?))?(?:/([^@]+))?")
INSTALL_HINT = "pip install huggingface_hub"
# {(reference, the hub's cache folder, offline): local file}. One run resolves its
# reference several times (the config check, the loading, the backbone fingerprint):
# online each is a request to the hub, and a moving revision ("main") must not give
# the fingerprint a different file than the one loaded.
_RESOLVED: dict[tuple[str, str, bool], str] = {}


def is_hub_reference(path) -> bool:
  """Whether ``path`` is an ``hf://`` reference (not a local or gs:// path)."""
  return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_reference(reference: str) -> tuple[str, str | None, str]:
  """"hf://org/name@rev/dir/file" -> ("org/name", "rev", "dir/file").

  The revision is None (the hub's "main") and the file "" when absent. A
  revision cannot contain "/" here (branch names with slashes: use the commit).
  """
  match = _REFERENCE.fullmatch(reference)
  if not match:
    raise errors.UserError(
        f"{reference!r} is not a hub reference; write hf://<org>/<repo>[@revision][/file], "
        "e.g. hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
  repo_id, revision, filename = match.groups()
  if revision and "/" in revision:
    revision, _, rest = revision.partition("/")
    filename = rest + ("/" + filename if filename else "")
  return repo_id, revision, filename or ""


def _hub():
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    import huggingface_hub.constants  # pylint: disable=g-import-not-at-top,unused-import
    import huggingface_hub.errors  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise errors.UserError(
        f"hf:// checkpoint references need the huggingface_hub package: {INSTALL_HINT} "
        "(or pass a local file path)") from e
  return huggingface_hub


def _download(hub, repo_id: str, filename: str, revision) -> str | None:
  """The cached (or downloaded) file, or None if the repository lacks it."""
  try:
    return hub.hf_hub_download(repo_id, filename, revision=revision)
  except (hub.errors.EntryNotFoundError, hub.errors.LocalEntryNotFoundError):
    return None


def _with_shards(hub, repo_id: str, index_name: str, index_path: str, revision) -> str:
  """Fetches every shard an index names (they land beside it in the snapshot)."""
  with open(index_path, encoding="utf-8") as f:
    weight_map = json.load(f).get("weight_map", {})
  folder = os.path.dirname(index_name)
  for shard in sorted(set(weight_map.values())):
    name = f"{folder}/{shard}" if folder else shard
    if _download(hub, repo_id, name, revision) is None:
      raise errors.UserError(f"hf://{repo_id}: shard {name} of {os.path.basename(index_path)} "
                             "is not on the hub or in the cache (HF_HUB_OFFLINE=1?)")
  return index_path


def local_path(path: str) -> str:
  """``path`` itself, or the local file an ``hf://`` reference resolves to.

  Resolved once per process (and hub cache folder and offline mode); again
  only if that file has gone since.

  Raises:
    UserError: huggingface_hub is missing, or neither the hub nor the cache
      (offline) has the file (the message names the files tried).
  """
  if not is_hub_reference(path):
    return path
  parsed = parse_reference(path)  # a malformed reference fails before the package is needed
  hub = _hub()
  key = (path, str(hub.constants.HF_HUB_CACHE), bool(hub.constants.HF_HUB_OFFLINE))
  if key not in _RESOLVED or not os.path.exists(_RESOLVED[key]):
    _RESOLVED[key] = _resolve(hub, path, *parsed)
  return _RESOLVED[key]


def _resolve(hub, path: str, repo_id: str, revision, filename: str) -> str:
  """The hub's (or its cache's) file for the reference ``path`` (see ``local_path``)."""
  for candidate in (filename,) if filename else WEIGHT_FILES:
    try:
      found = _download(hub, repo_id, candidate, revision)
    except hub.errors.RepositoryNotFoundError as e:
      raise errors.UserError(f"{path}: no such hub repository {repo_id} (or it is "
                             "private: log in with `hf auth login`)") from e
    if found is not None:
      return (_with_shards(hub, repo_id, candidate, found, revision)
              if candidate.endswith(".index.json") else found)
  offline = " with HF_HUB_OFFLINE=1 only the cache is read;" if os.environ.get(
      "HF_HUB_OFFLINE", "") not in ("", "0") else ""
  raise errors.UserError(
      f"{path}: found none of {', '.join((filename,) if filename else WEIGHT_FILES)} in "
      f"hf://{repo_id}@{revision or 'main'};{offline} name the file, e.g. {path}/model.safetensors")
