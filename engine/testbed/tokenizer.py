"""A real CLIP BPE tokenizer, built offline from the vocabulary that open_clip_torch ships.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (49,408 tokens). open_clip_torch carries the
same merges as ``bpe_simple_vocab_16e6.txt.gz``; from it we write the ``vocab.json`` and ``merges.txt`` that
``transformers.CLIPTokenizer`` reads, so the testbed needs no download. Token ids equal open_clip's
(``open_clip.tokenize``) from BOS through EOS. Padding follows SD 1.x (pad = ``<|endoftext|>``, id 49407) rather
than open_clip's id 0: a pad token of ``"!"`` would be split out of prompts as a special token.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def _bpe_path() -> Path:
    import open_clip.tokenizer as oct

    return Path(oct.default_bpe())


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) into ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder
