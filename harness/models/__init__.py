"""Models are pluggable by Hydra `_target_`: any nn.Module mapping token ids (B, T) to logits (B, T, V).

The forward may return the logits as a tensor, an object with a `.logits` tensor (a Hugging Face
`ModelOutput`, so `transformers` models train as they are), or a tuple whose first element is the
logits. `logits_of` reads them; anything else fails at the first step, saying what came back.
"""

from __future__ import annotations

import torch

from harness.config import ConfigError

EXPECTED = ("a logits tensor (batch, seq, vocab), an object with a .logits tensor (a Hugging Face ModelOutput) "
            "or a tuple whose first element is the logits")


class ModelOutputError(ConfigError):
    """The model's forward returned something the trainer cannot read logits from: the trainer stops
    as on any bad setting (exit 2), since model._target_ chose that model."""


def logits_of(output: object, tokens: torch.Tensor) -> torch.Tensor:
    """The (B, T, V) logits in a model's `output` for the input `tokens` (B, T); ModelOutputError otherwise."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        logits = output.logits  # type: ignore[union-attr]
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise ModelOutputError(f"the forward of the model (model._target_) returned {_describe(output)}; "
                               f"expected {EXPECTED}")
    if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        raise ModelOutputError(f"the model's (model._target_) logits have shape {tuple(logits.shape)} for input "
                               f"of shape {tuple(tokens.shape)}; expected (batch, seq, vocab) = "
                               f"{(*tokens.shape, 'vocab')}")
    return logits


def _describe(output: object) -> str:
    kind = f"{type(output).__module__}.{type(output).__qualname__}"
    if isinstance(output, dict):
        return f"a {kind} with keys {sorted(map(str, output))}"
    if isinstance(output, tuple):
        return f"a {kind} of {len(output)} elements, the first a {type(output[0]).__name__}"
    return f"a {kind}"
