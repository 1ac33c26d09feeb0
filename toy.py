"""The toy world: a procedural captioned shapes dataset and a tiny Stable Diffusion trained on it.

(Work in progress: for now only the tokenizer-file writer the tests use.)
"""
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder, words):
    """Write `vocab.json` + `merges.txt` for a CLIP BPE tokenizer that knows exactly `words`.

    CLIP's BPE marks a word's last symbol with `</w>`; every letter is in the vocabulary (alone and
    word-final) and each word is built by left-to-right merges, so `CLIPTokenizer` reads these
    files exactly like SD-1.5's tokenizer folder, and unknown words still tokenize letter by letter.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'") | set("".join(words)))
    vocab = {}
    for symbol in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
