r"""Command-line entry point: parses flags and calls into vpt_jax.

  python run.py --config configs/quickstart.py --workdir /tmp/quickstart
  python run.py --config configs/vpt.py:method=vpt_deep,num_prompts=50,builder=dmlab \
      --workdir /tmp/dmlab [--mode train|evaluate|export|predict]
  python run.py --config configs/vtab_protocol.py:method=vpt_deep,tasks=dmlab+eurosat \
      --workdir /results/vpt_deep [--mode train|report]
  python run.py --mode predict --tasks cifar=/exports/cifar,dtd=/exports/dtd \
      --inputs cifar:a.png,dtd:b.jpg [--backbone ViT-B_16.npz] [--output predictions.jsonl]
"""

from vpt_jax import main

if __name__ == "__main__":
  main.run()
