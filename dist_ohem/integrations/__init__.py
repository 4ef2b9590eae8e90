"""Optional adapters for training frameworks (docs/DESIGN.md §5).

Each submodule imports its framework; nothing here is imported by ``import dist_ohem``:

- :mod:`dist_ohem.integrations.transformers`: ``OHEMTrainer`` (two-pass over sequences)
  and ``ohem_loss_func`` for ``transformers.Trainer(compute_loss_func=...)`` (token mask
  mode), extra ``[transformers]``;
- :mod:`dist_ohem.integrations.lm`: the language-model pieces they build on, plain torch.
"""
