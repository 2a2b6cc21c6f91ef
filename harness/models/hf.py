"""Any Hugging Face causal LM, built from its config alone: `model=hf model.model_type=llama`.

`causal_lm` returns the `transformers` model as it is, randomly initialised from the global torch RNG
(seeded like every model here), without downloading anything: `AutoConfig.for_model(model_type,
**config)` then `AutoModelForCausalLM.from_config`. The trainer reads the logits from the model's
output (harness/models/__init__.py), so nothing wraps it.

The sizes that belong to the data come from it, as for our GPT: `vocab_size` (data.vocab_size) and
`block_size` (data.block_size), which becomes the config's `max_position_embeddings` (GPT-2's
`n_positions`, through the config's attribute map) where the model type has positions at all. Setting
either in `model.config` too is an error, and so is a key the model type's config does not know
(transformers would keep a misspelt `num_hiden_layers` silently and build the default depth). The KV
cache is off (`use_cache: false`) unless model.config turns it on: training never reads it.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from harness.config import ConfigError

# Accepted by every transformers config and by from_config, though not stored under these names.
_ALWAYS_ACCEPTED = {"attn_implementation"}
_FROM_DATA = {"vocab_size": "model.vocab_size (data.vocab_size)",
              "max_position_embeddings": "model.block_size (data.block_size)"}


def causal_lm(model_type: str, vocab_size: int, block_size: int, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised `AutoModelForCausalLM` of `model_type`; ConfigError naming the key on bad input."""
    config = dict(config or {})
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.model_type={model_type!r} is not a transformers model type; use one of the "
                          "causal LM types, e.g. gpt2, llama, mistral, qwen2, phi3, gemma, gpt_neox, opt")
    config_class: type[PretrainedConfig] = CONFIG_MAPPING[model_type]
    known = _known_keys(config_class)
    sizes: dict[str, Any] = {"vocab_size": vocab_size}
    if known is None or "max_position_embeddings" in known:
        sizes["max_position_embeddings"] = block_size
    _check_keys(model_type, config_class, config, known, sizes)
    config.setdefault("use_cache", False)
    hf_config = AutoConfig.for_model(model_type, **sizes, **config)
    try:
        return AutoModelForCausalLM.from_config(hf_config)
    except ValueError as err:
        if "AutoModelForCausalLM" not in str(err):
            raise
        raise ConfigError(f"model.model_type={model_type!r} has no causal LM head in transformers "
                          "(AutoModelForCausalLM); use a decoder such as gpt2, llama, mistral, qwen2") from None


def _known_keys(config_class: type[PretrainedConfig]) -> set[str] | None:
    """The keys a config of this class stores, by their own names and their aliases; None for the few
    classes whose defaults alone do not make a valid config (gemma4_assistant), left unchecked."""
    try:
        defaults = config_class().to_dict()
    except StrictDataclassError:
        return None
    return set(defaults) | set(config_class.attribute_map) | _ALWAYS_ACCEPTED


def _check_keys(model_type: str, config_class: type[PretrainedConfig], config: dict[str, Any],
                known: set[str] | None, sizes: dict[str, Any]) -> None:
    aliases = config_class.attribute_map
    from_data = {aliases.get(name, name): name for name in sizes}
    for key in config:
        if aliases.get(key, key) in from_data:
            name = from_data[aliases.get(key, key)]
            raise ConfigError(f"model.config.{key} is set by {_FROM_DATA[name]}; set that instead")
        if known is not None and key not in known:
            keys = ", ".join(sorted(k for k in known if not k.startswith("_")))
            raise ConfigError(f"model.config.{key} is not a key of {config_class.__name__} (model.model_type="
                              f"{model_type}); its keys: {keys}")
