r"""One FGVC dataset (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars).

VPT's FGVC pipeline: resize 256, random crop 224 + horizontal flip to train,
centre crop to evaluate; train on train, evaluate val and test. Without
``path`` the TFDS builder is used (not for NABirds); with ``path`` VPT's split
files DIR/{train,val,test}.json and the images below DIR. Example:

  python run.py --workdir /tmp/cub --config configs/fgvc.py:dataset=cub,path=/data/CUB_200_2011 \
    --config.model.init_checkpoint=/data/ViT-B_16.npz \
    --config.optim.base_lr=0.1 --config.optim.weight_decay=0.01
"""

from configs import common
from vpt_jax.data import fgvc


def get_config(arg: str = ""):
  args = common.parse_arg(arg, dataset="cub", **common.DATA_ARGS, **common.MODEL_ARGS)
  dataset = fgvc.get_dataset(args.dataset)
  config = common.model_config(args)
  config.data.task = f"fgvc/{dataset.name}"
  config.data.preprocess = "resize_crop_flip"
  # PIL's bilinear resize (torchvision, VPT) smooths when shrinking.
  config.data.resize = "antialias_bilinear"
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.test_split = "test"
  config.lock()
  return config
