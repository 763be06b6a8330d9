"""Run configurations (ml_collections), loaded with `--config=configs/<name>.py`."""
