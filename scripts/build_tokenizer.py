"""Build the CLIP BPE tokenizer files bundled in handler/configs/clip_tokenizer/.

The source is the BPE merges file that the open-clip-torch wheel ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). It is not a runtime dependency: fetch the wheel once
with `pip download --no-deps open-clip-torch -d /tmp/oc` and pass its path.

    python scripts/build_tokenizer.py /tmp/oc/open_clip_torch-*.whl

Writes vocab.json (49,408 entries), merges.txt (48,894 merges) and tokenizer_config.json in the
Hugging Face format.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OUT_DIR = Path(__file__).resolve().parent.parent / "handler" / "configs" / "clip_tokenizer"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (its line 0 is a version header).
NUM_MERGES = 49152 - 256 - 2


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) exactly as CLIP's SimpleTokenizer builds them."""
    merges = bpe_text.split("\n")[1 : NUM_MERGES + 1]
    base = list(byte_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="path to an open_clip_torch-*.whl")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with zipfile.ZipFile(args.wheel) as wheel:
        bpe_text = gzip.decompress(wheel.read(BPE_MEMBER)).decode("utf-8")
    vocab, merges = build(bpe_text)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    # Without model_max_length, transformers assumes ~1e30 and the pipelines pad to it.
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    print(json.dumps({"vocab": len(vocab), "merges": len(merges), "out": str(args.out)}))


if __name__ == "__main__":
    main()
