"""Tools that build and measure the toy world's models (the models and the task live in ``data/toy``):

    python -m scripts.toy.train --size small ...   # toy-small / toy-large (train.py)
    python -m scripts.toy.train_prm ...            # toy-prm (train_prm.py)

``evaluate`` measures a toy model on held-out problems (used by train.py, bench/toy.py and the tests).
Run from the repository root; these import ``tracegen``, which ``data`` must not.
"""
