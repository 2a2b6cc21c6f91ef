"""Models are pluggable by Hydra `_target_`: any nn.Module mapping token ids (B, T) to logits (B, T, V)."""
