"""The base config of one training run, and the "key=value" argument parser.

A config file's ``get_config(arg)`` starts from ``base_config()`` and sets the
fields its argument string names; everything can still be overridden on the
command line (``--config.optim.base_lr=0.5``). Configs are locked: a misspelt
key fails instead of being silently added.
"""

from __future__ import annotations

import difflib

import ml_collections

from vpt_jax.methods import registry


def base_config() -> ml_collections.ConfigDict:
  """Every field of a single run, with the VPT reference's defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 42                  # any integer
  config.method = "vpt_deep"
  # Ordered (regex, "train"|"frozen") rules over parameter paths; empty means
  # the method's own rules.
  config.trainable_rules = ()

  config.model = ml_collections.ConfigDict()
  config.model.variant = "B/16"
  config.model.image_size = 224
  config.model.dropout_rate = 0.1   # in [0, 1); 0 = off
  # Compute only what the output reads (exact); False runs the plain forward.
  config.model.skip_dead_work = True
  # Backbone compute dtype: float32 | bfloat16 (bf16 matmuls and activations;
  # parameters, prompts, head, loss and optimizer state stay float32).
  config.model.dtype = "float32"
  # none | block: recompute each block's activations in the backward pass
  # (less memory for ViT-L/H, about one more forward pass of time).
  config.model.remat = "none"
  # einsum | dot_product | recompute: the attention kernel of ViT and Swin (equal up
  # to rounding; dot_product = jax.nn.dot_product_attention, JAX picks the
  # implementation; recompute = einsum whose backward pass recomputes the attention
  # weights instead of keeping them: less memory, a little more time).
  config.model.attention = "einsum"
  # Backbone .npz (local path or gs://). Empty is refused unless from_scratch:
  # a method that freezes the backbone would tune prompts on random features.
  config.model.init_checkpoint = ""
  # True: start every parameter from its random init (init_checkpoint must be
  # empty); the only way to train without a backbone file.
  config.model.from_scratch = False

  config.prompt = ml_collections.ConfigDict()
  config.prompt.num_prompts = 50    # >= 1 for prompt methods; unread by the others
  config.prompt.dropout = 0.1       # in [0, 1); 0 = off
  config.prompt.projection = -1     # >= 1: prompts of this width, projected; < 1 = none
  config.prompt.pool = "original"
  # VPT's ablations (vpt_shallow/vpt_deep/vpt+bias on ViTs; methods/prompt_ablations.py):
  # location prepend | add | add-1 | pad | below | prepend-pixel[-gaussian|-imgnettransform];
  # deep_layers k >= 1: deep prompts in the first k blocks only (0 = all), reverse_deep:
  # the last k; deep_shared: one set for every block; deep_noexpand: prompts leave after
  # block k - 1; init random | final-cls | cls-nolastl | cls-nofirstl (per-class mean
  # class-token embeddings of the training split; num_prompts = number of classes).
  config.prompt.location = "prepend"
  config.prompt.deep_layers = 0
  config.prompt.reverse_deep = False
  config.prompt.deep_shared = False
  config.prompt.deep_noexpand = False
  config.prompt.init = "random"

  # Settings of the other methods; each is read only by the method(s) named.
  # Prompt counts and prompt dropout of VPT, VFPT, E2VPT and CVPT are the
  # config.prompt fields above.
  config.cvpt = ml_collections.ConfigDict()
  config.cvpt.insert = 3            # cross-attention position 1..5 (3 = reference)
  config.cvpt.drop_path = 0.1       # stochastic depth on the frozen SA/MLP branches, [0, 1)
  config.mlp = ml_collections.ConfigDict()   # mlp-k (k in the method name)
  config.mlp.dropout = 0.1          # in [0, 1)
  config.adapter = ml_collections.ConfigDict()
  config.adapter.reduction = 8      # bottleneck D // reduction; the paper: 8, 64, 256
  config.adapter.init = "default"   # default (working) | vpt_reference (both zero)
  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 8
  config.lora.alpha = 8.0           # update scale alpha / rank (0 = no update)
  config.lora.targets = "query,value"  # any of query,key,value,out
  # Re-parameterisable methods (drop_path: stochastic depth while training, [0, 1)).
  config.ssf = ml_collections.ConfigDict()
  config.ssf.drop_path = 0.1        # dongzelian/SSF VTAB-1k scripts
  config.difffit = ml_collections.ConfigDict()
  config.difffit.drop_path = 0.1    # OSU ViT_PEFT_Vision default_vtab_processed.yml
  config.ln_tune = ml_collections.ConfigDict()
  config.ln_tune.drop_path = 0.1    # OSU ViT_PEFT_Vision default_vtab_processed.yml
  config.fact = ml_collections.ConfigDict()  # fact_tt and fact_tk (PETL-ViT FacT/)
  config.fact.rank = 8              # r >= 1; per-task 4..32 (protocol.hparams.FACT_TASKS)
  config.fact.scale = 1.0           # s; per-task 0.01..100
  config.fact.dropout = 0.1         # on the cores' output, [0, 1)
  config.fact.drop_path = 0.1
  config.repadapter = ml_collections.ConfigDict()  # luogen1996/RepAdapter repblock
  config.repadapter.dim = 8         # hidden features h, a multiple of groups
  config.repadapter.groups = 2      # conv_B's groups
  config.repadapter.scale = 1.0     # s; per-task 0.1..10 (protocol.hparams)
  config.repadapter.dropout = 0.1   # after conv_A, [0, 1)
  config.repadapter.drop_path = 0.1
  config.vfpt = ml_collections.ConfigDict()
  config.vfpt.percentage = 0.5      # floor(num_prompts * percentage) Fourier prompts
  config.vfpt.dimension = "all"     # all | hidden | sequence
  config.e2vpt = ml_collections.ConfigDict()
  config.e2vpt.kv_prompts = 5       # key-value prompts per block (visual: prompt.*)
  config.e2vpt.kv_dropout = 0.0     # in [0, 1)
  # Bottleneck adapters (methods/bottleneck_adapters.py; defaults: the official codes).
  config.houlsby = ml_collections.ConfigDict()
  config.houlsby.bottleneck = 8     # adapter_plus's houlsby.yaml; OSU grid 4, 8, 16, 32
  config.houlsby.scale = 0.1        # s in a + s Adapter(a): OSU's default; grid 0.01..10
  config.houlsby.dropout = 0.1      # on the bottleneck, [0, 1)
  # Each section's backbone_drop_path: the official code's stochastic depth on the
  # frozen branches while training (linear over the blocks), [0, 1).
  config.houlsby.backbone_drop_path = 0.1
  config.adaptformer = ml_collections.ConfigDict()
  config.adaptformer.bottleneck = 64
  config.adaptformer.scale = 0.1    # s beside the MLP
  config.adaptformer.norm = "none"  # none | in | out (the adapter's LayerNorm)
  config.adaptformer.dropout = 0.1  # [0, 1)
  config.adaptformer.backbone_drop_path = 0.0  # main_image.py's --drop_path default
  config.adapter_plus = ml_collections.ConfigDict()
  config.adapter_plus.bottleneck = 8  # the paper's per-task 1..32: protocol/hparams.py
  config.adapter_plus.drop_path = 0.1  # on the adapter branch while training, [0, 1)
  config.adapter_plus.backbone_drop_path = 0.1
  config.convpass = ml_collections.ConfigDict()  # methods/convpass.py (PETL-ViT's code)
  config.convpass.bottleneck = 8    # d; OSU grid 8, 16
  config.convpass.scale = 1.0       # s (set_Convpass's default); per task 0.01..100
  config.convpass.conv_init = "identity"  # identity (centre tap) | xavier
  config.convpass.dropout = 0.1     # on the bypass before Up, [0, 1)
  config.convpass.backbone_drop_path = 0.1  # and on each bypass, independently
  # Pruning (methods/e2vpt_pruning.py): prune=True trains token and piece masks on the
  # visual prompts; pruned_tokens "3,7" and pruned_pieces "0:1 5;2:3" fix them (rewinding).
  config.e2vpt.prune = False
  config.e2vpt.pieces = 16          # pieces per prompt token (piece j: dims d, d % pieces == j)
  config.e2vpt.pruned_tokens = ""
  config.e2vpt.pruned_pieces = ""
  config.vqt = ml_collections.ConfigDict()
  config.vqt.num_queries = 1        # query tokens per block (the reference's scripts: 1)
  config.vqt.dropout = 0.1          # per-example dropout on the queries, [0, 1)
  config.vqt.combine = "concat"     # concat | mean | weighted_sum (reference) | osu
  config.sidetune = ml_collections.ConfigDict()
  config.sidetune.widths = "32,64,128"  # side CNN channels (stride-2 3x3 convs)
  config.sidetune.checkpoint = ""   # optional .npz of the side CNN
  # Head-only methods (every backbone parameter frozen, no augmentation: linear,
  # mlp-k) compute the backbone features once and train the head on them.
  config.cache_features = True

  # The linear head from class embeddings (training/head_init.py, text_heads.py):
  # "" = the method's random init | file (head.file: a (num_classes, D) float .npy)
  # | text (CLIP / SigLIP text tower: the class names in the templates, averaged).
  # kernel = scale * rows.T, bias 0; rows L2-normalised (file: if head.normalize).
  config.head = ml_collections.ConfigDict()
  config.head.init = ""
  config.head.file = ""
  config.head.normalize = True
  config.head.scale = 0.0           # >= 0; 0 = text: the checkpoint's exp(logit_scale); file: 1
  config.head.text_checkpoint = ""  # text: CLIP/open_clip/SigLIP file ("" = model.init_checkpoint)
  config.head.tokenizer = ""        # text: the checkpoint's tokenizer.json (pip install tokenizers)
  config.head.class_names = ""      # text: a file of class names, one a line ("" = the dataset's)
  config.head.templates = ""        # text: "|"-separated templates besides "a photo of a {}."
  config.head.text_heads = 0        # text: attention heads; 0 = width // 64 (CLIP's rule)
  config.head.text_activation = "quick_gelu"  # CLIP: quick_gelu (OpenAI) | gelu (most open_clip)

  config.data = ml_collections.ConfigDict()
  config.data.builder = ""          # TFDS name[/config][:version]
  config.data.data_dir = ""         # TFDS data_dir; empty = TFDS default
  config.data.train_split = "train[:800]+validation[:200]"
  config.data.eval_split = ""       # evaluated every eval.every_epochs ("" = none)
  config.data.test_split = "test"   # evaluated at the end and reported ("" = none)
  # Every non-empty split must select at least one example and the classes be
  # at least 2: checked from the sizes before the first step (check_data_splits).
  config.data.image_key = "image"
  config.data.label_key = "label"
  config.data.num_classes = 0       # 0 = from the dataset's metadata; else >= 2
  config.data.resize = "tf1_bilinear"
  config.data.normalization = "imagenet"  # imagenet | minus_one_to_one
  # "" reads data.builder; vtab/<task> (the 19 VTAB-1k tasks, label functions and
  # splits train800|val200|train800val200|test), fgvc/<dataset>, folder, list, json
  # (vpt_jax/data/sources.py). With data.path, vtab/ and fgvc/ read the extracted
  # VTAB-1k folder and VPT's JSON split files instead of TFDS.
  config.data.task = ""
  config.data.path = ""             # folder of a file-based dataset
  # resize (squash to image_size, no augmentation: VTAB) | resize_crop_flip
  # (shorter side to 256/224 x image_size, random crop + flip to train, centre crop
  # to evaluate: FGVC).
  config.data.preprocess = "resize"
  # data.task=fewshot/<dataset> (data/few_shot.py): images per class (1, 2, 4, 8, 16)
  # and the draw (NOAH's seeds 0, 1, 2).
  config.data.shots = 0
  config.data.shots_seed = 0
  config.data.skip_corrupt = False  # skip unreadable image files (counted) instead of failing
  # Record each split's fingerprint (count, class histogram, hashes of ids, labels and
  # resized pixels: vpt_jax/data/fingerprints.py) in results.json; one pass per split.
  config.data.fingerprint = True

  config.optim = ml_collections.ConfigDict()
  config.optim.name = ""            # "" = the method's default (sgd | adamw)
  config.optim.base_lr = 0.1        # > 0; scaled by batch_size / 256
  config.optim.weight_decay = 1e-4  # >= 0; 0 = off (the reference AdamW then is SGD)
  config.optim.momentum = 0.9       # in [0, 1); read by sgd
  config.optim.batch_size = 128     # >= 1
  # Split each batch into this many micro-batches inside the step and sum their
  # gradients before one update (1 = off): the step of the whole batch with the
  # activation memory of batch_size / accumulation_steps.
  config.optim.accumulation_steps = 1
  config.optim.epochs = 100         # > 0 (fractions allowed)
  config.optim.warmup_epochs = 10.0  # in [0, epochs]
  config.optim.schedule_unit = "epoch"  # epoch (reference) | step
  # True: the optimizer state is split over the devices (ZeRO stage 1), not replicated.
  config.optim.shard_state = False

  config.eval = ml_collections.ConfigDict()
  # >= 0; 0 = only at the end. Without data.eval_split nothing is validated while
  # training (the protocol's final runs train on train+val so).
  config.eval.every_epochs = 0
  config.eval.batch_size = 256      # >= 1; the last batch is padded and masked
  # Write the test split's per-example logits (float16) and labels to
  # predictions_test.npz beside results.json (training/predictions.py); the
  # protocol keeps them for its final runs only, and its report reads them.
  config.eval.save_predictions = False
  # Measure the run's costs into results.json["cost"] (training/costs.py): export
  # bytes, train and inference images/s, peak memory, FLOPs per image.
  config.eval.costs = True

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500  # >= 0; 0 = every step (and always the last)
  config.checkpoint.keep = 2        # >= 1: the newest saves kept

  config.log_every_steps = 20       # >= 1
  # At the end of a run (and with --mode export): the task export (WORKDIR/export:
  # trained leaves + task.json, served with vpt_jax) and, for format stablehlo or
  # saved_model, the model that serves without vpt_jax in WORKDIR/export/<format>/.
  config.export = ml_collections.ConfigDict()
  config.export.enabled = True      # False: no export at the end of training
  config.export.format = "npz"      # npz | stablehlo | saved_model
  config.export.batch_size = 0      # stablehlo/saved_model: 0 = any batch size, else fixed
  config.export.platforms = "cpu,cuda,tpu"  # stablehlo/saved_model: lowered for these
  # Also write WORKDIR/export_merged: the method folded into a plain ViT backbone
  # (official layout) plus a linear task on it; methods linear in the weights only.
  config.export.merged = False
  # Files to classify in predict mode (comma-separated paths) and the export to use.
  config.predict = ml_collections.ConfigDict()
  config.predict.images = ""
  config.predict.export_dir = ""
  return config


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses "key=value,flag,..." into a ConfigDict typed by ``defaults``.

  A bare key sets a boolean to True. Unknown keys fail with the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      raise ValueError(f"Unknown config argument {key!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; valid: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} expects true/false, got {value!r}")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    parsed[key] = value
  return parsed


def apply_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets the method and the reference's per-method defaults (vpt.md 2, 5.4)."""
  spec = registry.get_method(method)
  config.method = spec.name
  if method == "vpt_shallow":
    config.prompt.dropout = 0.0  # the reference uses no dropout for VPT-shallow
  if spec.optimizer == "adamw":
    # The reference's finetune config: AdamW, 5 warmup epochs, lr grid
    # {5e-3, 1e-3, 5e-4, 1e-4} (vpt.md 5.4).
    config.optim.warmup_epochs = 5
    config.optim.base_lr = 1e-3
  if spec.name == "cvpt":
    # CVPT's train.py (cvpt.md 1.7): AdamW wd 0.05, batch 32, lr 1e-3 (per task
    # 1e-3 .. 1e-2), 10 warmup epochs, 10 prompts as the FGVC default.
    config.optim.weight_decay = 0.05
    config.optim.batch_size = 32
    config.optim.base_lr = 1e-3 * 256 / 32  # lr 1e-3 after the batch / 256 scaling
    config.prompt.num_prompts = 10
  if spec.name in ("houlsby", "adapter_plus", "convpass"):
    # OSU ViT_PEFT_Vision / PETL-ViT / adapter_plus: torch AdamW lr 1e-3, wd 1e-4,
    # batch 64, 100 epochs with 10 warmup.
    config.optim.batch_size = 64
    config.optim.base_lr = 1e-3 * 256 / 64  # lr 1e-3 after the batch / 256 scaling
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 10
  if spec.name == "adaptformer":
    # AdaptFormer's main_image.py: SGD momentum 0.9, blr 0.1 (per 256), no weight
    # decay, 20 warmup epochs.
    config.optim.base_lr = 0.1
    config.optim.weight_decay = 0.0
    config.optim.warmup_epochs = 20
  if spec.name == "e2vpt":
    config.prompt.num_prompts = 10  # E2VPT's command.txt: N_p = 10 for most VTAB tasks
  if spec.name in REPARAM_DEFAULTS:
    batch, lr, weight_decay = REPARAM_DEFAULTS[spec.name]
    config.optim.batch_size = batch
    config.optim.base_lr = lr * 256 / batch  # the official lr after the batch / 256 scaling
    config.optim.weight_decay = weight_decay
    config.optim.warmup_epochs = 10


# (batch, lr, weight decay) of the re-parameterisable methods' official runs, 100
# epochs with 10 warmup: FacT fact_tt.py / fact_tk.py and RepAdapter train.py
# (AdamW 1e-3, 1e-4, batch 64); OSU ViT_PEFT_Vision for DiffFit and LN-tune (its
# default_vtab_processed.yml, the lowest of its lr/wd grid); SSF's VTAB-1k
# scripts (batch 32, the lr and wd most of its tasks use, protocol.hparams.SSF_TASKS).
REPARAM_DEFAULTS = {"fact_tt": (64, 1e-3, 1e-4), "fact_tk": (64, 1e-3, 1e-4),
                    "repadapter": (64, 1e-3, 1e-4), "difffit": (64, 1e-3, 1e-4),
                    "ln_tune": (64, 1e-3, 1e-4), "ssf": (32, 5e-3, 5e-5)}


# The arguments every single-run config file takes, with their defaults.
# num_prompts=None: the method's default (50; CVPT, E2VPT 10); a given 0 is refused.
MODEL_ARGS = dict(method="vpt_deep", num_prompts=None, variant="B/16", image_size=224,
                  checkpoint="gs://vit_models/imagenet21k/ViT-B_16.npz", runlocal=False)
# And those of config files for tasks that can come from TFDS or from files.
DATA_ARGS = dict(data_dir="", path="")


def given_prompts(args: ml_collections.ConfigDict):
  """The num_prompts argument as an int, or None when it was not given."""
  # parse_arg keeps the string of a None default: the int is read here.
  return None if args.num_prompts is None else int(args.num_prompts)


def model_config(args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``base_config()`` with parsed ``MODEL_ARGS`` (and ``DATA_ARGS``) applied, unlocked."""
  config = base_config()
  apply_method(config, args.method)
  if given_prompts(args) is not None:
    config.prompt.num_prompts = given_prompts(args)
  config.model.variant = args.variant
  config.model.image_size = args.image_size
  config.model.init_checkpoint = args.checkpoint
  for key in DATA_ARGS:
    if key in args:
      config.data[key] = args[key]
  if args.runlocal:  # a tiny smoke run
    config.optim.batch_size = 8
    config.optim.epochs = 2
    config.optim.warmup_epochs = 1
    config.eval.batch_size = 8
  return config
