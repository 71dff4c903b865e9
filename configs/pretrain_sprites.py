r"""Pretraining of the quickstart backbone (reproduces assets/sprites_vit_nano8.npz).

  python run.py --config configs/pretrain_sprites.py --workdir /tmp/pretrain
"""

import ml_collections


def get_config(arg: str = ""):
  del arg
  config = ml_collections.ConfigDict()
  config.suite = "pretrain_sprites"
  config.variant = "nano/8"
  config.image_size = 32
  # Position-invariant attributes of single, large sprites.
  config.attributes = ("shape", "color", "scale_bin")
  config.min_scale = 0.18
  config.max_scale = 0.35
  config.images_per_epoch = 10000  # drawn fresh every epoch
  config.epochs = 30
  config.batch_size = 128
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.clip_norm = 1.0
  config.warmup_fraction = 0.05
  config.init_seed = 0       # backbone; the attribute heads use init_seed + 1
  config.data_seed = 12345   # epoch e draws sprites with seed data_seed + e
  config.shuffle_seed = 7
  config.output_name = "sprites_vit_nano8.npz"
  config.lock()
  return config
