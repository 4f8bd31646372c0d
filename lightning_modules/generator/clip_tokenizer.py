"""An offline CLIP tokenizer: the CLIP BPE vocabulary shipped inside open_clip, as a transformers CLIPTokenizer.

No hub download: open_clip's wheel carries ``bpe_simple_vocab_16e6.txt.gz``; rebuilding vocab.json/merges.txt
from it the way CLIP does gives ids equal to open_clip's own tokenizer (and to openai/clip-vit-*).
The tiny pixel-space generator uses it with a text encoder trained from scratch; a real Stable Diffusion
directory brings its own tokenizer.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe

NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
START, END = "<|startoftext|>", "<|endoftext|>"


def write_clip_vocab(out_dir: str | Path, bpe_path: str | None = None) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (CLIP layout) into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe_path = bpe_path or default_bpe()
    if not Path(bpe_path).is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found: {bpe_path} (is open_clip_torch installed?)")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + [START, END]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # tmp + rename: concurrent DDP ranks may build the same cache
    for name, text in (("vocab.json", json.dumps(vocab, ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")):
        tmp = out_dir / f"{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return out_dir


def offline_clip_tokenizer(cache_dir: str | Path | None = None, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built from open_clip's bundled vocabulary (cached in ``cache_dir``, by
    default a per-user folder under the system temp dir)."""
    import tempfile

    from transformers import CLIPTokenizer

    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / f"synfer_clip_bpe_{os.getuid() if hasattr(os, 'getuid') else 0}"
    cache_dir = Path(cache_dir)
    if not ((cache_dir / "vocab.json").is_file() and (cache_dir / "merges.txt").is_file()):
        write_clip_vocab(cache_dir)
    return CLIPTokenizer(str(cache_dir / "vocab.json"), str(cache_dir / "merges.txt"),
                         model_max_length=model_max_length, bos_token=START, eos_token=END, pad_token=END,
                         unk_token=END)
