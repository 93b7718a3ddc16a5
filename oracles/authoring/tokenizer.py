"""A byte-level BPE tokenizer for a model case's vocabulary, written as Hugging Face tokenizer
files (tokenizer.json, tokenizer_config.json) by this project's own code: no download, no
`tokenizers` package needed to write it.

Engines need tokenizer files to load a checkpoint directory even when they are fed token ids
(llama.cpp's HF-to-GGUF converter reads the vocabulary and the merges, and llama.cpp needs at
least one merge; vLLM and transformers read tokenizer_config.json). The golden cases feed ids, so
the tokenizer only has to be valid and match the config: exactly `vocab_size` entries, id
`bos_token_id` and `eos_token_id` the special tokens, the rest byte tokens in GPT-2's printable
byte alphabet (see byte_alphabet) and merges of them.

Layout for vocabulary size V (V >= 4):
    the special tokens (bos, eos) at their config ids;
    min(256, V - specials - 1) byte tokens, newline and space first, then printable ASCII,
    then the other bytes in order;
    the remaining ids are merges of two earlier tokens (at least one), in rank order.
"""

from __future__ import annotations

import json
import os

BOS = "<｜begin▁of▁sentence｜>"  # DeepSeek's special token names
EOS = "<｜end▁of▁sentence｜>"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b -> a printable unicode character. Printable Latin-1
    bytes map to themselves; the other 68 bytes map, in byte order, to U+0100 onwards (so the
    space 0x20 is 'Ġ' U+0120 and the newline 0x0A is 'Ċ' U+010A)."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _byte_order() -> list[int]:
    first = [0x0A, 0x20] + list(range(0x21, 0x7F))
    return first + [b for b in range(256) if b not in first]


def vocabulary(vocab_size: int, bos_id: int | None = 0, eos_id: int | None = 1):
    """-> (tokens: list of str indexed by id, merges: list of (left, right), special ids).
    Deterministic in its arguments."""
    specials = {i: s for i, s in ((bos_id, BOS), (eos_id, EOS)) if i is not None}
    if any(not 0 <= i < vocab_size for i in specials):
        raise ValueError(f"special token ids {sorted(specials)} outside the vocabulary of {vocab_size}")
    n_plain = vocab_size - len(specials)
    if n_plain < 3:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for two bytes and one merge")
    alphabet = byte_alphabet()
    n_bytes = min(256, n_plain - 1)
    plain = [alphabet[b] for b in _byte_order()[:n_bytes]]
    merges = []
    known = set(plain)
    # merges: byte pairs, space + printable first ("Ġ!", "Ġ\"", ...), then merged tokens
    # extended by one byte, until the vocabulary is full
    pool = list(plain)
    lefts = pool[1:2] + pool[2:] + pool[:1]
    rights = pool[2:] + pool[:2]
    i = 0
    while len(plain) < n_plain:
        a = lefts[i] if i < len(lefts) else plain[len(pool) + i - len(lefts)]
        i += 1
        for b in rights:
            if len(plain) >= n_plain:
                break
            if a + b not in known:
                merges.append((a, b))
                plain.append(a + b)
                known.add(a + b)
    tokens, it = [], iter(plain)
    for i in range(vocab_size):
        tokens.append(specials[i] if i in specials else next(it))
    return tokens, merges, sorted(specials)


def tokenizer_json(vocab_size: int, bos_id: int | None = 0, eos_id: int | None = 1) -> dict:
    tokens, merges, special_ids = vocabulary(vocab_size, bos_id, eos_id)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in special_ids],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def tokenizer_config(vocab_size: int, bos_id: int | None, eos_id: int | None, max_len: int) -> dict:
    tokens, _, _ = vocabulary(vocab_size, bos_id, eos_id)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "pad_token": tokens[eos_id] if eos_id is not None else None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


def generation_config(bos_id: int | None, eos_id: int | None) -> dict:
    """Greedy by default: the cases' token streams are greedy."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}


def write(model_dir: str, cfg) -> list[str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json for `cfg` (a
    refimpl.Config) in model_dir -> the file names written."""
    files = {
        "tokenizer.json": tokenizer_json(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id),
        "tokenizer_config.json": tokenizer_config(cfg.vocab_size, cfg.bos_token_id,
                                                  cfg.eos_token_id, cfg.max_position_embeddings),
        "generation_config.json": generation_config(cfg.bos_token_id, cfg.eos_token_id),
    }
    for name, obj in files.items():
        path = os.path.join(model_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
            f.write("\n")
        os.replace(path + ".tmp", path)
    return list(files)
