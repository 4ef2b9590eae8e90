"""Optional adapters for training frameworks (docs/DESIGN.md §5).

Each submodule imports its framework; nothing here is imported by ``import dist_ohem``:

- :mod:`dist_ohem.integrations.transformers`: ``ohem_loss_func`` for
  ``transformers.Trainer(compute_loss_func=...)`` (extra ``[transformers]``).
"""
