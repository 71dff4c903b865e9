"""VPT's own ablations (Jia et al. 2022, Figs. 5-7 and App. B) as config options.

The reference runs them through ``src/models/vit_prompt/vit_ablations.py`` and
the prompt options of ``src/configs/config.py`` (KMnP/vpt); here they are
fields of ``config.prompt`` read by the VPT methods (vpt_shallow, vpt_deep,
vpt+bias) on ViT backbones:

=====================  ============================  ===============================
config.prompt.         reference                     meaning
=====================  ============================  ===============================
location               PROMPT.LOCATION               prepend | add | add-1 | pad |
                                                     below | prepend-pixel[-gaussian|
                                                     -imgnettransform]
deep_layers            PROMPT.NUM_DEEP_LAYERS        k >= 1: deep prompts in the first k
                                                     blocks only (0 = all)
reverse_deep           PROMPT.REVERSE_DEEP           ... in the last k blocks instead
deep_shared            PROMPT.DEEP_SHARED            one prompt set for every block
deep_noexpand          PROMPT.FORWARD_DEEP_NOEXPAND  prompts leave the sequence after
                                                     block k - 1
init                   PROMPT.INITIATION             random | final-cls | cls-nolastl |
                                                     cls-nofirstl
=====================  ============================  ===============================

The spec holds them as its ``prompt_ablation`` section, present only when some
option differs from the default (so every earlier spec is unchanged). The
pixel locations are the reference's shallow-only ones (its deep forward has no
deep pixel prompts); ``below`` also trains the patch convolution's pretrained
kernel and bias, as the reference's ``build_backbone`` unfreezes
``embeddings.patch_embeddings``. Where the reference keeps a parameter it never
reads (``deep_prompt_embeddings`` under DEEP_SHARED) we create none.
"""

from __future__ import annotations

from typing import Any, Mapping

from vpt_jax.methods import base
from vpt_jax.models import backbones
from vpt_jax.models import pixel_prompts
from vpt_jax.models import vit_variants
from vpt_jax.params.freezing import TRAIN

TOKEN_LOCATIONS = ("prepend", "add", "add-1")
LOCATIONS = TOKEN_LOCATIONS + pixel_prompts.PIXEL_LOCATIONS
CLASS_TOKEN_INITS = ("final-cls", "cls-nolastl", "cls-nofirstl")
INITS = ("random",) + CLASS_TOKEN_INITS
# The methods whose prompts these options shape.
ABLATION_METHODS = ("vpt_shallow", "vpt_deep", "vpt+bias")
DEFAULTS = dict(location="prepend", deep_layers=0, reverse_deep=False, deep_shared=False,
                deep_noexpand=False, init="random")
# ``below`` trains the patch convolution (the reference's build_backbone).
BELOW_RULES = ((r"embedding/(kernel|bias)", TRAIN),)


def read_ablation(config) -> dict[str, Any]:
  """The config's prompt ablation options (``DEFAULTS``' keys), typed."""
  section = config.prompt
  return dict(location=str(section.location), deep_layers=int(section.deep_layers),
              reverse_deep=bool(section.reverse_deep), deep_shared=bool(section.deep_shared),
              deep_noexpand=bool(section.deep_noexpand), init=str(section.init))


def spec_section(config) -> dict[str, Any] | None:
  """The spec's ``prompt_ablation`` section, or None when every option is the default."""
  ablation = read_ablation(config)
  return None if ablation == DEFAULTS else ablation


def options(spec: Mapping[str, Any]) -> dict[str, Any]:
  """A spec's ablation options (the defaults when it has no section)."""
  return {**DEFAULTS, **(spec.get("prompt_ablation") or {})}


def extra_rules(spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """Trainable rules the ablation adds before the method's own."""
  return BELOW_RULES if options(spec)["location"] == "below" else ()


def _depth_checks(ablation: Mapping[str, Any], deep: bool, depth: int) -> None:
  k = ablation["deep_layers"]
  depth_options = k or ablation["reverse_deep"] or ablation["deep_shared"] or (
      ablation["deep_noexpand"])
  if depth_options and not deep:
    base.fail("prompt.deep_layers/reverse_deep/deep_shared/deep_noexpand shape deep prompts; "
              "use --config.method=vpt_deep")
  if not 0 <= k <= depth:
    base.fail(f"prompt.deep_layers={k} must lie in [0, {depth}] (0 = every block)")
  if ablation["reverse_deep"] and not k:
    base.fail("prompt.reverse_deep needs prompt.deep_layers=k >= 1 (the last k blocks)")
  if sum(map(bool, (ablation["reverse_deep"], ablation["deep_shared"],
                    ablation["deep_noexpand"]))) > 1:
    base.fail("prompt.reverse_deep, deep_shared and deep_noexpand exclude each other (the "
              "reference runs one forward per option); set at most one")
  if ablation["deep_noexpand"] and not 0 < k < depth:
    base.fail(f"prompt.deep_noexpand removes the prompts after block k - 1; set "
              f"prompt.deep_layers=k in [1, {depth - 1}]")


def _location_checks(ablation: Mapping[str, Any], spec: Mapping[str, Any], deep: bool) -> None:
  location = ablation["location"]
  if location not in LOCATIONS:
    base.fail(f"Unknown prompt.location {location!r}; choose one of {LOCATIONS}")
  if location != "prepend" and spec["pool"] != "original":
    base.fail(f"prompt.pool={spec['pool']!r} reads prepended prompts; use "
              "prompt.location=prepend or prompt.pool=original")
  if ablation["deep_noexpand"] and (location != "prepend" or spec["pool"] != "original"):
    base.fail("prompt.deep_noexpand needs prompt.location=prepend and prompt.pool=original")
  if location in pixel_prompts.PIXEL_LOCATIONS:
    if deep:
      base.fail(f"prompt.location={location} is shallow only in the reference; use "
                "--config.method=vpt_shallow")
    if spec["prompt_projection"] >= 1:
      base.fail(f"prompt.location={location} makes pixel prompts; set prompt.projection=-1")


def _init_checks(ablation: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
  init = ablation["init"]
  if init not in INITS:
    base.fail(f"Unknown prompt.init {init!r}; choose one of {INITS}")
  if init != "random" and (ablation["location"] != "prepend" or ablation["deep_layers"]
                           or spec["prompt_projection"] >= 1):
    base.fail(f"prompt.init={init} sets prepended width-D prompts in every block (the "
              "reference's); use location=prepend, deep_layers=0, projection=-1")


def check(spec: Mapping[str, Any]) -> None:
  """Refuses ablation options that the method, the backbone or each other rule out.

  Raises:
    ValueError: one line naming the option and the fix.
  """
  if "prompt_ablation" not in spec:
    return
  if spec["method"] not in ABLATION_METHODS:
    base.fail(f"prompt.location/deep_layers/reverse_deep/deep_shared/deep_noexpand/init are "
              f"VPT's ablations; use them with {', '.join(ABLATION_METHODS)}, not "
              f"{spec['method']}")
  if backbones.get_family(spec["variant"]).name != "vit":
    base.fail(f"VPT's prompt ablations are implemented for ViT backbones, not "
              f"{spec['variant']}; reset the prompt.location/deep_*/init options")
  ablation = options(spec)
  deep = spec["method"] != "vpt_shallow"
  _location_checks(ablation, spec, deep)
  _depth_checks(ablation, deep, vit_variants.geometry(spec["variant"]).depth)
  _init_checks(ablation, spec)


def hook_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
  """``prompts.VptOptions``' ablation fields from a spec."""
  ablation = options(spec)
  return dict(location=ablation["location"], deep_layers=ablation["deep_layers"],
              reverse=ablation["reverse_deep"], shared=ablation["deep_shared"],
              noexpand=ablation["deep_noexpand"], image_size=int(spec["image_size"]))
