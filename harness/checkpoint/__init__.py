"""Tiered, asynchronous, atomic and verified checkpoints (DCP format): manager.py is the engine and
describes the path a checkpoint takes; store.py, gcs.py, manifest.py, snapshot.py and tiers.py its parts.

Nothing is imported here, so that checking a store (store.py, tiers.py) does not load torch."""
