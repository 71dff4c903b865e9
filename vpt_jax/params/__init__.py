"""Parameter trees: flat path views and trainable/frozen labels (the bottom layer)."""
