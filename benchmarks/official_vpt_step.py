r"""The official PyTorch VPT training step (KMnP/vpt), timed in its own interpreter.

Runs in a Python that has torch (never ours: it imports neither jax nor
vpt_jax) and prints one JSON line: the method, batch, seconds per step (median
of ``--steps`` after one warm-up step), images per second, this process's
peak resident memory and, with ``--count_flops``, the step's matmul and
convolution GFLOP (torch's flop counter, over one more step). ``benchmarks/side_by_side.py`` runs it beside our step.

  /tmp/torch-venv/bin/python benchmarks/official_vpt_step.py --checkout /tmp/kmnp-vpt \
      --method vpt_deep --batch_size 16 --steps 3 --threads 2 --num_prompts 50

What one step is, read from the official code (random weights, random
inputs: neither changes a step's cost):
- The model is the official ``ViT`` wrapper (``src/models/vit_models.py``)
  rebuilt here from its parts: the encoder ``enc`` is the official
  ``PromptedVisionTransformer`` (VPT-deep: prompts prepended after the class
  token, replaced before every block but the first) or ``VisionTransformer``
  (full fine-tuning), both with ``num_classes=-1`` (identity head), followed
  by ``head``, the official ``MLP`` with no hidden layer (``last_layer``, a
  Linear to ``--num_classes``). ``vit_models.py`` itself is not imported: it
  imports torchvision, which is left out of the scratch venv (PyPI's
  torchvision breaks beside this torch). ``src/models/vit_prompt/vit.py``
  also imports torchvision but never uses it on this path, so when torchvision
  is not installed an empty stub module stands in for it.
- Trainable parameters as ``ViT.build_backbone``: for "prompt" every encoder
  parameter whose name lacks "prompt" is frozen (the head trains); for
  "end2end" everything trains.
- Train mode as ``trainer.train_classifier``: ``model.train()``, which for VPT
  goes through ``PromptedTransformer.train`` and keeps the encoder and
  embeddings in eval mode (no backbone dropout; only the prompt dropout, 0.1
  here as in our VPT-deep config; the official default is 0.0), and for full
  fine-tuning trains with the backbone's dropout 0.1.
- The optimizer is the official ``make_optimizer``: "prompt" configs
  (``configs/base-prompt.yaml``) use SGD, momentum 0.9, weight decay 1e-4;
  "finetune" configs (``configs/base-finetune.yaml``) its own AdamW (weight
  decay 0.01 on non-bias parameters). The loss is the official softmax
  cross-entropy with unit class weights.
- One step is ``trainer.forward_one_batch``: forward, loss, its inf/NaN check,
  ``zero_grad``, backward, ``optimizer.step``. The inputs are float32 images,
  already normalised (the official data loader does that outside the step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import types

# Transfer type and optimizer of each method, as the official configs set them.
METHODS = {
    "vpt_deep": {"transfer_type": "prompt", "optimizer": "sgd"},
    "full": {"transfer_type": "end2end", "optimizer": "adamw"},
}
# The official ViT-B/16 key (src/models/vit_backbones/vit.py: CONFIGS).
MODEL_TYPES = {"B/16": "sup_vitb16_224", "L/16": "sup_vitl16_224"}
PROMPTED_MODULE = os.path.join("src", "models", "vit_prompt", "vit.py")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkout", required=True,
                      help="a KMnP/vpt checkout (the folder holding src/ and configs/)")
  parser.add_argument("--method", choices=sorted(METHODS), default="vpt_deep")
  parser.add_argument("--variant", choices=sorted(MODEL_TYPES), default="B/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--prompt_dropout", type=float, default=0.1)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--count_flops", action="store_true",
                      help="after the timing, run one more step under torch's flop counter "
                           "and add its matmul and convolution GFLOP to the JSON line")
  parser.add_argument("--matmul_ceiling", action="store_true",
                      help="only time a dense float32 2048^3 matmul in torch with --threads "
                           "threads and print its GFLOP/s (side_by_side.py's torch ceiling)")
  parser.add_argument("--check_only", action="store_true",
                      help="import torch and the official modules, print the torch version, "
                           "stop (side_by_side.py's probe)")
  return parser.parse_args(argv)


def fail(message: str) -> None:
  """Exits with status 1 and one line on stderr."""
  sys.exit(f"official_vpt_step.py: error: {message}")


def import_official(checkout: str) -> dict:
  """The official modules this step needs, imported from ``checkout``.

  Returns {"torch", "prompted", "backbone", "mlp", "optimizer", "losses"}.
  """
  if not os.path.isfile(os.path.join(checkout, PROMPTED_MODULE)):
    fail(f"--checkout {checkout} is not a KMnP/vpt checkout (no {PROMPTED_MODULE}); "
         "pass the folder that holds src/ and configs/")
  if importlib.util.find_spec("torch") is None:
    fail(f"torch is not importable by {sys.executable}; run this script with a Python that "
         "has torch (see 'Side by side with the official PyTorch VPT' in benchmarks/README.md)")
  if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
    sys.modules["torchvision"] = types.ModuleType("torchvision")  # imported, never used
  sys.path.insert(0, os.path.abspath(checkout))
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from src.models import mlp  # pylint: disable=g-import-not-at-top
    from src.models.vit_backbones import vit as backbone  # pylint: disable=g-import-not-at-top
    from src.models.vit_prompt import vit as prompted  # pylint: disable=g-import-not-at-top
    from src.solver import losses  # pylint: disable=g-import-not-at-top
    from src.solver import optimizer  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as error:
    fail(f"the official code needs the module {error.name!r}: pip install it into "
         f"{sys.prefix} (see benchmarks/README.md)")
  return {"torch": torch, "prompted": prompted, "backbone": backbone, "mlp": mlp,
          "optimizer": optimizer, "losses": losses}


def prompt_config(args) -> types.SimpleNamespace:
  """The MODEL.PROMPT fields PromptedVisionTransformer reads (VPT-deep, prepended, random)."""
  return types.SimpleNamespace(
      NUM_TOKENS=args.num_prompts, LOCATION="prepend", INITIATION="random", PROJECT=-1,
      DEEP=True, NUM_DEEP_LAYERS=None, DEEP_SHARED=False, DROPOUT=args.prompt_dropout,
      VIT_POOL_TYPE="original")


def solver_config(method: str) -> types.SimpleNamespace:
  """The SOLVER fields make_optimizer reads, as the official base configs set them."""
  return types.SimpleNamespace(
      OPTIMIZER=METHODS[method]["optimizer"], BASE_LR=0.01, WEIGHT_DECAY=1e-4, MOMENTUM=0.9,
      BIAS_MULTIPLIER=1.0, DBG_TRAINABLE=False)


def build_model(official: dict, args):
  """The official ViT wrapper's structure: ``enc`` (encoder, identity head) then ``head``."""
  nn = official["torch"].nn
  model_type = MODEL_TYPES[args.variant]
  if METHODS[args.method]["transfer_type"] == "prompt":
    encoder = official["prompted"].PromptedVisionTransformer(
        prompt_config(args), model_type, args.image_size, num_classes=-1)
  else:
    encoder = official["backbone"].VisionTransformer(model_type, args.image_size, num_classes=-1)
  hidden = official["backbone"].CONFIGS[model_type].hidden_size
  model = nn.Sequential()  # named children "enc" and "head", as in vit_models.ViT
  model.add_module("enc", encoder)
  model.add_module("head", official["mlp"].MLP(input_dim=hidden, mlp_dims=[args.num_classes],
                                               special_bias=True))
  if METHODS[args.method]["transfer_type"] == "prompt":
    for name, parameter in model.enc.named_parameters():
      parameter.requires_grad = "prompt" in name
  model.train()  # PromptedTransformer.train keeps VPT's encoder in eval mode
  return model


def make_step(official: dict, args):
  """A closure running one official training step on fixed random inputs."""
  torch = official["torch"]
  model = build_model(official, args)
  optimizer = official["optimizer"].make_optimizer([model], solver_config(args.method))
  criterion = official["losses"].SoftmaxLoss()
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                       generator=generator)
  targets = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
  class_weights = [1.0] * args.num_classes

  def step():
    outputs = model(images)
    loss = criterion(outputs, targets, class_weights)
    if loss == float("inf") or torch.isnan(loss).any():
      raise FloatingPointError(f"the official step's loss is {loss.item()}")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
  return step


def matmul_gflops(torch, size: int = 2048, repeats: int = 5) -> float:
  """Dense float32 (size x size) @ (size x size) throughput in torch, median of repeats.

  The figure our side's ceiling (``train_step.matmul_gflops``, JAX) is set
  against: the same product in the official side's library (MKL or oneDNN).
  """
  a = torch.ones(size, size)
  return 2 * size ** 3 / median_seconds(lambda: torch.matmul(a, a), repeats) / 1e9


def counted_matmul_gflop(torch, step) -> float:
  """GFLOP of the matmuls and convolutions of one ``step``, as torch counts them.

  ``torch.utils.flop_counter`` counts 2 FLOPs per multiply-add of mm, bmm,
  addmm, convolutions and their backward passes, not the elementwise work: the
  counterpart of the matmul FLOPs ``profile_step.py`` reads from our HLO.
  """
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  with flop_counter.FlopCounterMode(display=False) as counter:
    step()
  return counter.get_total_flops() / 1e9


def median_seconds(step, count: int) -> float:
  """Median wall seconds of ``count`` calls after one warm-up call."""
  step()
  times = []
  for _ in range(count):
    began = time.perf_counter()
    step()
    times.append(time.perf_counter() - began)
  return statistics.median(times)


def main(argv=None):
  args = parse_args(argv)
  official = import_official(args.checkout)
  torch = official["torch"]
  if args.check_only:
    print(json.dumps({"torch": torch.__version__}), flush=True)
    return
  torch.set_num_threads(args.threads)
  if args.matmul_ceiling:
    print(json.dumps({"GFLOP/s": matmul_gflops(torch), "threads": torch.get_num_threads()}),
          flush=True)
    return
  torch.manual_seed(0)
  step = make_step(official, args)
  seconds = median_seconds(step, args.steps)
  # Counted after the timing, in one more step: the counter slows what it watches.
  counted = {"matmul GFLOP": counted_matmul_gflop(torch, step)} if args.count_flops else {}
  print(json.dumps({
      "implementation": "official", "method": args.method, "batch": args.batch_size,
      "variant": args.variant, "image_size": args.image_size, "prompts": args.num_prompts,
      "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
      "s/step": seconds, "img/s": args.batch_size / seconds if seconds else math.inf,
      **counted,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
        flush=True)


if __name__ == "__main__":
  main()
