"""How samcache's own `tiny` model was pretrained: its synthetic shapes data and its recipe.

Not part of what users run: `--model tiny` loads the weights this recipe made (models.py
ships and pins them); this package is how they came about, so that anyone can re-make them
(`scripts/pretrain_tiny.py`).

- `shapes.py`: the synthetic shapes images (never stamps) the model learnt from.
- `recipe.py`: the two stages, end to end: decoder warm-up with samcache's own embed/train,
  then `pretrain.py`'s end-to-end training.
- `pretrain.py`: end-to-end training of encoder + decoder on freshly drawn images, and the
  held-out evaluation recorded in the weights' provenance.
"""
