"""Text files to the uint16 token format that `data=tokens` reads:

    python -m harness.data.prepare INPUT... --out train.bin [--tokenizer tokenizer.json]

The inputs are read in the order given and their tokens written one after the other, nothing between
them. Byte-level by default: each byte of the file is one token, so the vocabulary is 256 and nothing
is downloaded. With `--tokenizer`, a local Hugging Face `tokenizer.json` (the `tokenizers` package)
encodes UTF-8 text, a block of whole lines at a time, with no special tokens added; its vocabulary
(added tokens included) must fit uint16 (at most 65536 ids).

The output is written whole or not at all (a temporary file renamed into place). The summary names
the token count and the `data.vocab_size` to train with. Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

UINT16_IDS = 1 << 16
_BLOCK = 4 << 20  # bytes read (byte-level) or characters encoded (tokenizer) at a time


def byte_tokens(path: Path) -> Iterator[np.ndarray]:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            yield np.frombuffer(block, dtype=np.uint8).astype(np.uint16)


def tokenizer_tokens(tokenizer_file: Path) -> tuple[Callable[[Path], Iterator[np.ndarray]], int]:
    """An encoder of files with the tokenizer in `tokenizer_file`, and its vocabulary size."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"--tokenizer {str(tokenizer_file)!r}: not a tokenizer.json ({err})") from None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > UINT16_IDS:
        raise ValueError(f"--tokenizer {tokenizer_file}: {vocab} token ids do not fit uint16 (at most {UINT16_IDS})")

    def encode(path: Path) -> Iterator[np.ndarray]:
        with open(path, encoding="utf-8") as f:
            while lines := f.readlines(_BLOCK):
                encodings = tokenizer.encode_batch_fast(lines, add_special_tokens=False)
                yield np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encodings])

    return encode, vocab


def prepare(inputs: list[Path], out: Path, tokenizer_file: Path | None = None) -> tuple[int, int]:
    """Write the tokens of `inputs` to `out`; returns (token count, vocabulary size)."""
    for path in inputs:
        if not path.is_file():
            raise ValueError(f"INPUT {str(path)!r}: no such file")
    encode, vocab = tokenizer_tokens(tokenizer_file) if tokenizer_file else (byte_tokens, 256)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for path in inputs:
                try:
                    for tokens in encode(path):
                        f.write(tokens.tobytes())
                        count += len(tokens)
                except UnicodeDecodeError as err:
                    raise ValueError(f"INPUT {str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                     "a --tokenizer reads text, the byte-level default reads any file") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count, vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="text files, in order")
    parser.add_argument("--out", required=True, type=Path, help="the uint16 token file to write (e.g. train.bin)")
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer.json; default: byte-level (vocab 256)")
    args = parser.parse_args(argv)
    if args.tokenizer and not args.tokenizer.is_file():
        parser.error(f"--tokenizer {str(args.tokenizer)!r}: no such file (a local tokenizer.json)")
    try:
        count, vocab = prepare(args.inputs, args.out, args.tokenizer)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = f"tokenizer {args.tokenizer}" if args.tokenizer else "byte-level"
    print(f"wrote {args.out}: {count} tokens ({kind}) from {len(args.inputs)} file(s)")
    print(f"train on it with: data=tokens data.path={args.out} data.vocab_size={vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
