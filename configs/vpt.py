r"""VPT (or any method) on one TFDS dataset with a pretrained ViT.

Example (VTAB DMLab, ViT-B/16 ImageNet-21k, VPT-deep with 100 prompts):

  python run.py --workdir /tmp/dmlab \
    --config configs/vpt.py:method=vpt_deep,num_prompts=100,builder=dmlab:2.0.1 \
    --config.model.init_checkpoint=gs://vit_models/imagenet21k/ViT-B_16.npz \
    --config.optim.base_lr=1.0 --config.optim.weight_decay=1e-3 \
    --config.optim.batch_size=64
"""

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, builder="", **common.MODEL_ARGS)
  config = common.model_config(args)
  config.data.builder = args.builder
  config.lock()
  return config
