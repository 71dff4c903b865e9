r"""NOAH's few-shot FGVC grid (or 16-shot ImageNet + domain generalisation), one command.

Datasets x methods x shots (1, 2, 4, 8, 16) x draws (0, 1, 2), each trained on
the drawn shots and scored on the test split (vpt_jax/protocol/few_shot_protocol.py).
Every method runs with NOAH's shared settings (configs/*/few-shot/*.sh and
supernet_train_prompt.py's defaults): AdamW, lr 0.005 at batch 64, weight
decay 1e-4, 100 epochs, 10 warmup epochs, cosine.

  python run.py --workdir /results/fewshot \
    --config configs/few_shot_protocol.py:methods=vpt_deep+lora+linear,datasets=fgvc \
    --config.model.init_checkpoint=/data/ViT-B_16.npz --config.data.data_dir=~/tensorflow_datasets

  # domain generalisation: 16-shot ImageNet, scored on ImageNet-V2/-Sketch/-A/-R
  python run.py --workdir /results/dg \
    --config configs/few_shot_protocol.py:methods=vpt_deep+lora,datasets=imagenet,shots=16,targets=all \
    --config.model.init_checkpoint=/data/ViT-B_16.npz --config.data.data_dir=~/tensorflow_datasets

datasets: "fgvc" (FGVC-Aircraft, Food-101, Oxford Flowers, Oxford Pets,
Stanford Cars), "imagenet", or "+"-joined names. path=DIR reads NOAH's list
files: DIR/<NOAH folder>/annotations/... per dataset (fgvc-aircraft, food101,
oxford-flowers102, oxford-pets, standford-cars, imagenet), or DIR itself for one
dataset; without it the shots are drawn from TFDS (vpt_jax/data/few_shot.py).
shots=16 or seeds=0 limit the grid ("+"-joined). Spread the runs over n jobs with
--config.few_shot.shard=i/n; rerunning skips finished runs. Report:
python -m vpt_jax.protocol.report WORKDIR (or --mode report).
"""

import ml_collections

from configs import common

NOAH_BATCH = 64
NOAH_LR = 0.005


def get_config(arg: str = ""):
  args = common.parse_arg(arg, methods="vpt_deep", datasets="fgvc", shots="1+2+4+8+16",
                          seeds="0+1+2", targets="", shard="0/1",
                          **common.DATA_ARGS, **common.MODEL_ARGS)
  args.method = args.methods.split("+")[0]
  config = common.model_config(args)
  config.data.preprocess = "resize_crop_flip"
  config.data.resize = "antialias_bilinear"  # PIL's resize (torchvision, NOAH)
  config.optim.name = "adamw"
  config.optim.batch_size = NOAH_BATCH
  config.optim.base_lr = NOAH_LR * 256 / NOAH_BATCH  # lr 0.005 after the batch / 256 scaling
  config.optim.weight_decay = 1e-4
  config.optim.epochs = 100
  config.optim.warmup_epochs = 10
  config.few_shot = ml_collections.ConfigDict(dict(
      datasets=args.datasets, methods=args.methods,
      shots=tuple(int(s) for s in args.shots.split("+") if s),
      seeds=tuple(int(s) for s in args.seeds.split("+") if s),
      # "" = none; "all" or "+"-joined imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r
      targets=args.targets,
      shard=args.shard,
  ))
  if args.runlocal:  # one draw of one shot count
    config.few_shot.shots = (1,)
    config.few_shot.seeds = (0,)
  config.lock()
  return config
