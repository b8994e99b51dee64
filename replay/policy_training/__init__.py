"""The pieces of `trace train policy`, whose entry (hyperparameters and the two-model loop) is
``replay.train_policy``: ``episodes`` (the decision process on the cache), ``update`` (thresholded policy,
V-trace, constraint, kappa, critics, CPO), ``results`` (policy file, log, result) and ``k_models`` (the state
graph and loop with more than two models in play)."""
