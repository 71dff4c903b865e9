"""Image preprocessing: decode-time resizing, FGVC's shorter-side resize and crops.

Resizing follows the VTAB reference (task_adaptation, TF1): bilinear without
half-pixel centres (``tf.compat.v1.image.resize_bilinear`` with
``align_corners=False, half_pixel_centers=False``); the result is rounded back
to uint8, which differs from the reference's float pipeline by at most half a
grey level.

Two preprocessings (``PREPROCESS_MODES``): "resize" squashes every image to
S x S with no augmentation (VTAB); "resize_crop_flip" resizes the shorter side
to ``crop_resize_size(S)`` (256 for S = 224), then takes a random S x S crop
and a random horizontal flip for training (``training_stream.train_batch``)
and the centre crop for evaluation (FGVC, VPT's torchvision pipeline).

Images stay uint8; ``data.normalization.normalize_images`` maps them to floats
on the device, which keeps host-to-device transfers four times smaller.
"""

from __future__ import annotations

import tensorflow as tf

from vpt_jax import errors
from vpt_jax.data import source_protocols

RESIZE_METHODS = ("tf1_bilinear", "bilinear", "bicubic", "nearest",
                  "antialias_bilinear")
# "antialias_bilinear" widens the bilinear kernel when shrinking, as PIL (and
# so torchvision's Resize, which VPT's FGVC pipeline uses) does.
PREPROCESS_MODES = ("resize", "resize_crop_flip")


def _check_resize_method(method: str) -> None:
  if method not in RESIZE_METHODS:
    raise errors.UserError(f"Unknown resize method {method!r}; choose one of {RESIZE_METHODS}")


def check_modes(resize: str, preprocess: str) -> None:
  """Raises ValueError naming the choices for an unknown resize or preprocess mode."""
  _check_resize_method(resize)
  if preprocess not in PREPROCESS_MODES:
    raise errors.UserError(f"Unknown preprocess mode {preprocess!r}; choose one of "
                           f"{PREPROCESS_MODES}")


def resize_images(images, image_size: int, method: str = "tf1_bilinear"):
  """Resizes a uint8 image (H, W, C) or batch (B, H, W, C) to image_size^2.

  Greyscale (C == 1) is tiled to RGB. Returns a uint8 tf.Tensor; an image that
  already has the size is returned unchanged (no resampling).
  """
  _check_resize_method(method)
  images = tf.convert_to_tensor(images)
  if images.shape[-1] == 1:
    images = tf.concat([images] * 3, axis=-1)
  elif images.shape[-1] != 3:
    raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
  batched = images.shape.rank == 4
  if not batched:
    images = images[None]
  height, width = tf.shape(images)[1], tf.shape(images)[2]

  def resample():
    size = [image_size, image_size]
    out = _resample(images, size, method)
    # Bicubic overshoots; round to the nearest grey level.
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

  static_height, static_width = images.shape[1], images.shape[2]
  if static_height is not None and static_width is not None:
    # Known sizes (the usual case for TFDS image features): decide now.
    same = static_height == image_size and static_width == image_size
    out = tf.cast(images, tf.uint8) if same else resample()
  else:
    same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
    out = tf.cond(same, lambda: tf.cast(images, tf.uint8), resample)
  out = tf.ensure_shape(out, [None, image_size, image_size, 3])
  return out if batched else out[0]


def _resample(images, size, method: str):
  """float32 resampling of a uint8 batch (B, H, W, C) to size = [h, w]."""
  if method == "tf1_bilinear":
    return tf.compat.v1.image.resize_bilinear(
        images, size, align_corners=False, half_pixel_centers=False)
  if method == "antialias_bilinear":
    return tf.image.resize(images, size, method="bilinear", antialias=True)
  return tf.image.resize(images, size, method=method, antialias=False)


def crop_resize_size(image_size: int) -> int:
  """The shorter side before cropping: 256 for 224, 438 for 384 (VPT's rule)."""
  return image_size * 256 // 224


def resize_shorter_side(image, size: int, method: str = "tf1_bilinear"):
  """Resizes a uint8 image (H, W, C) so that min(H, W) == size, keeping its aspect.

  The longer side becomes int(size * long / short), as torchvision's
  Resize(size) does. Greyscale is tiled to RGB. Returns uint8 (H', W', 3).
  """
  _check_resize_method(method)
  image = tf.convert_to_tensor(image)
  if image.shape[-1] == 1:
    image = tf.concat([image] * 3, axis=-1)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.minimum(height, width)
  # Integer arithmetic: int(size * long / short) without float rounding surprises.
  new_height = tf.where(height == short, size, size * height // short)
  new_width = tf.where(width == short, size, size * width // short)

  def resample():
    out = _resample(image[None], tf.stack([new_height, new_width]), method)[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
  same = tf.logical_and(tf.equal(new_height, height), tf.equal(new_width, width))
  out = tf.cond(same, lambda: tf.cast(image, tf.uint8), resample)
  return tf.ensure_shape(out, [None, None, 3])


def center_crop(image, size: int):
  """The central size x size window of (H, W, C), H, W >= size.

  Offsets round((H - size) / 2) like torchvision's CenterCrop (half to even).
  """
  image = tf.convert_to_tensor(image)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top = tf.cast(tf.round(tf.cast(height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(width - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def preprocessed_examples(source: source_protocols.AnySource, *, image_size: int,
                          resize: str, preprocess: str = "resize", process_index: int = 0,
                          process_count: int = 1, crop: bool = True) -> tf.data.Dataset:
  """tf.data of {"image": uint8, "label": int32 ()} in stored order.

  Images are (S, S, 3) except for "resize_crop_flip" with crop=False (the
  training cache): shorter side ``crop_resize_size(S)``, aspect kept.
  """
  check_modes(resize, preprocess)
  ds = source_protocols.decoded_examples(source, process_index, process_count)

  def transform(example):
    image = example["image"]
    if preprocess == "resize":
      image = resize_images(image, image_size, resize)
    else:
      image = resize_shorter_side(image, crop_resize_size(image_size), resize)
      if crop:
        image = tf.ensure_shape(center_crop(image, image_size), [image_size, image_size, 3])
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}
  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
