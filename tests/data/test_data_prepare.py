"""`python -m harness.data.prepare`: text to uint16 tokens, byte-level or with a local tokenizer.json,
printing the token count and the data.vocab_size to train with; a prepared file trains with data=tokens."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from harness.data import prepare
from harness.data.tokens import TokenFile
from tests import runs

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, naïvely.\n" for i in range(120))


def test_byte_level_text_is_prepared_and_trains_with_data_tokens(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(TEXT)
    second.write_text("and the end.\n")
    out = tmp_path / "data" / "train.bin"
    proc = subprocess.run([sys.executable, "-m", "harness.data.prepare", str(first), str(second), "--out", str(out)],
                          cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    raw = first.read_bytes() + second.read_bytes()
    assert f"{len(raw)} tokens (byte-level) from 2 file(s)" in proc.stdout
    assert f"data=tokens data.path={out} data.vocab_size=256" in proc.stdout
    assert np.fromfile(out, dtype=np.uint16).tolist() == list(raw)
    assert TokenFile(vocab_size=256, block_size=32, path=str(out)).sample(1).tolist() == list(raw[32:65])

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    assert runs.run(0, ["data=tokens", f"data.path={out}", "data.vocab_size=256", "data.block_size=32",
                        "model.n_embd=32", "train.max_steps=5", f"run.dir={run_dir}"], log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["final_step"] == 5


def bpe_tokenizer(path, vocab_size: int = 300) -> Tokenizer:
    """A small BPE trained on TEXT here (nothing downloaded), saved as a tokenizer.json."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(TEXT.splitlines(keepends=True),
                                  trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return tokenizer


def test_a_local_tokenizer_json_encodes_and_names_its_vocab_size(tmp_path, capsys):
    tokenizer = bpe_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "a.txt").write_text(TEXT)
    out = tmp_path / "train.bin"
    argv = [str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", str(tmp_path / "tokenizer.json")]
    assert prepare.main(argv) == 0
    expected = [i for line in TEXT.splitlines(keepends=True) for i in tokenizer.encode(line).ids]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    printed = capsys.readouterr().out
    assert f"{len(expected)} tokens (tokenizer {tmp_path / 'tokenizer.json'})" in printed
    assert f"data.vocab_size={tokenizer.get_vocab_size()}" in printed


def test_bad_input_fails_naming_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "train.bin"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    tokenizer = tmp_path / "tokenizer.json"
    bpe_tokenizer(tokenizer)
    wide = tmp_path / "wide.json"
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0")).save(str(wide))
    (tmp_path / "not.json").write_text("{nope")
    for argv, says in [
        ([str(tmp_path / "missing.txt")], "INPUT '{}': no such file".format(tmp_path / "missing.txt")),
        ([str(tmp_path / "latin1.txt"), "--tokenizer", str(tokenizer)], "latin1.txt': not UTF-8 text"),
        ([str(tmp_path / "latin1.txt"), "--tokenizer", str(wide)], "70000 token ids do not fit uint16 (at most 65536)"),
        ([str(tmp_path / "latin1.txt"), "--tokenizer", str(tmp_path / "not.json")], "not.json': not a tokenizer.json"),
    ]:
        assert prepare.main([*argv, "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit) as exit_:
        prepare.main([str(tmp_path / "latin1.txt"), "--out", str(out), "--tokenizer", str(tmp_path / "no.json")])
    assert exit_.value.code == 2 and "--tokenizer" in capsys.readouterr().err
