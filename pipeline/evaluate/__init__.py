"""The `evaluate` stage: models side by side on validation (`evaluate`) and what it writes for
people and DVC: plot tables, figures, the Markdown report (`report`). `common` holds what the
classification task's `classify_evaluate` shares with it (model arguments, sizes, timing,
report helpers)."""
