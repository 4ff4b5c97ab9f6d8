"""Training of the embedded default draft/target pair (see train_default_pair.py)."""
