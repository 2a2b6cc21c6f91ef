"""Hugging Face models as they are, through real torchrun jobs: `model=hf` with a GPT-2 and a Llama
config (dropout on) is SIGKILLed after its first checkpoint, relaunched, and ends with the weights of
an uninterrupted run; a user function returning a transformers model unchanged trains through
`model._target_` (and is the GPT-2 reference: the same config built either way is the same model); a
forward whose output holds no logits stops at the first step, saying what came back."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from harness import config
from harness.models import ModelOutputError, logits_of
from harness.models.hf import causal_lm
from tests import runs

if TYPE_CHECKING:  # transformers takes seconds to import: only the tests that build a model pay it
    from transformers import GPT2LMHeadModel

TINY = ["data.block_size=32", "train.max_steps=30", "checkpoint.interval_steps=10", "checkpoint.write_threads=1",
        "train.global_batch_size=8"]
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2}  # its dropouts stay at GPT-2's 0.1
LLAMA = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 1, "attention_dropout": 0.1}


def hf(model_type: str, keys: dict) -> list[str]:
    return ["model=hf", f"model.model_type={model_type}", *(f"model.config.{k}={v}" for k, v in keys.items())]


def gpt2_as_is(vocab_size: int, block_size: int, **_unused) -> GPT2LMHeadModel:
    """A user's model function (model._target_=tests.models.test_hf_models.gpt2_as_is): the transformers model
    itself, KV cache and all, with GPT2 sized as `model=hf model.model_type=gpt2` with GPT2 above."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=block_size, **GPT2))


class DictOfHidden(nn.Module):
    """A forward that returns a dict without logits (model._target_=tests.models.test_hf_models.DictOfHidden)."""

    def __init__(self, vocab_size: int, **_unused):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.embed(idx)}


def kill_after_first_checkpoint_then_resume(tmp_path, overrides: list[str]) -> dict:
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    store = run_dir / "checkpoints"
    overrides = [*overrides, f"run.dir={run_dir}"]
    proc = runs.start(2, overrides, log)
    try:
        runs.wait_for(lambda: runs.committed(store) and not runs.in_progress(store), timeout=120,
                      what="the first checkpoint")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    assert runs.run(2, overrides, log) == 0, runs.tail(log)
    return runs.summary(run_dir)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
@pytest.mark.parametrize(("model_type", "keys", "reference"), [
    ("gpt2", GPT2, ["model._target_=tests.models.test_hf_models.gpt2_as_is"]),  # also: the user's function trains
    ("llama", LLAMA, None),
], ids=["gpt2", "llama"])
def test_hf_model_killed_and_relaunched_ends_as_an_uninterrupted_run(tmp_path, reference_sha, model_type, keys,
                                                                     reference, parallelism):
    """Under FSDP each decoder layer (the elements of the model's ModuleList) is sharded on its own."""
    model, strategy = hf(model_type, keys), [f"train.parallelism={parallelism}"]
    summary = kill_after_first_checkpoint_then_resume(tmp_path, [*TINY, *model, *strategy])
    assert summary["final_step"] == 30 and summary["restarts"] == 1
    assert summary["model_sha256"] == reference_sha(2, [*TINY, *(reference or model), *strategy])


def test_a_forward_without_logits_fails_at_the_first_step_saying_what_came_back(tmp_path):
    log = tmp_path / "log.txt"
    code = runs.run(0, ["model._target_=tests.models.test_hf_models.DictOfHidden", "train.max_steps=3",
                        f"run.dir={tmp_path / 'run'}"], log)
    assert code == 2, runs.tail(log)
    text = log.read_text()
    assert "returned a builtins.dict with keys ['hidden']" in text
    assert "expected a logits tensor (batch, seq, vocab), an object with a .logits tensor" in text
    assert "step 1/" not in text


def test_logits_are_read_from_a_tensor_a_model_output_or_a_tuple():
    x = torch.zeros(2, 5, dtype=torch.long)
    logits = torch.randn(2, 5, 7)
    output = causal_lm("llama", 7, 5, {k: LLAMA[k] for k in ("num_hidden_layers", "hidden_size",
                                                            "num_attention_heads")})(x)
    assert logits_of(output, x).shape == (2, 5, 7)  # a CausalLMOutputWithPast
    for form in (logits, (logits, "cache"), type("Out", (), {"logits": logits})()):
        assert logits_of(form, x) is logits
    for bad, says in [({"hidden": logits}, "dict with keys ['hidden']"), ([logits], "builtins.list"),
                      (("no", logits), "tuple of 2 elements, the first a str"),
                      (logits[:, -1], "logits have shape (2, 7) for input of shape (2, 5)")]:
        with pytest.raises(ModelOutputError, match=rf"model\._target_.*{re.escape(says)}"):
            logits_of(bad, x)


def test_model_hf_takes_its_sizes_from_the_data_and_any_key_of_the_model_type():
    cfg = config.load(["model=hf", "model.model_type=llama", "model.config.num_hidden_layers=2",
                       "data.block_size=48"])
    assert (cfg.model.vocab_size, cfg.model.block_size) == (cfg.data.vocab_size, 48)
    model = causal_lm(cfg.model.model_type, cfg.model.vocab_size, cfg.model.block_size,
                      {**cfg.model.config, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})
    sizes = model.config.num_hidden_layers, model.config.vocab_size, model.config.max_position_embeddings
    assert sizes == (2, 256, 48)
    assert model.config.use_cache is False
    assert causal_lm("gpt2", 256, 48, GPT2).config.n_positions == 48  # GPT-2 calls it n_positions


@pytest.mark.parametrize(("model_type", "keys", "says"), [
    ("lama", {}, r"model\.model_type='lama' is not a transformers model type"),
    ("t5", {}, r"model\.model_type='t5' has no causal LM head"),
    ("llama", {"num_hiden_layers": 2}, r"model\.config\.num_hiden_layers is not a key of LlamaConfig.*, num_hidden"),
    ("gpt2", {"n_positions": 64}, r"model\.config\.n_positions is set by model\.block_size \(data\.block_size\)"),
    ("llama", {"vocab_size": 64}, r"model\.config\.vocab_size is set by model\.vocab_size \(data\.vocab_size\)"),
], ids=["unknown-type", "no-causal-lm", "misspelt-key", "context-length", "vocab-size"])
def test_a_bad_hf_config_names_the_key(model_type, keys, says):
    with pytest.raises(config.ConfigError, match=says):
        causal_lm(model_type, 256, 32, keys)
