"""Time PNG encoding at each zlib level on 1024x1024 photographs, and print JSON.

    python scripts/measure_png.py PHOTO.png [PHOTO.png ...]

Each photo is resized to 1024x1024 (bicubic), like an SDXL output. The figures in README's
"Encoding" section come from this script (photos: scikit-image's astronaut, coffee and chelsea).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from PIL import Image


def measure(image: Image.Image, level: int, repeats: int = 5) -> tuple[float, int]:
    """Best-of-`repeats` seconds and the size in bytes at one compress level."""
    best, size = float("inf"), 0
    for _ in range(repeats):
        buffer = io.BytesIO()
        started = time.perf_counter()
        image.save(buffer, format="PNG", compress_level=level)
        best = min(best, time.perf_counter() - started)
        size = buffer.tell()
    return best, size


def main() -> None:
    photos = [
        Image.open(p).convert("RGB").resize((1024, 1024), Image.BICUBIC) for p in sys.argv[1:]
    ]
    rows = []
    for level in range(10):
        seconds, sizes = zip(*(measure(photo, level) for photo in photos), strict=True)
        rows.append(
            {
                "compress_level": level,
                "mean_ms": round(1000 * sum(seconds) / len(seconds), 1),
                "mean_kib": round(sum(sizes) / len(sizes) / 1024),
            }
        )
    print(
        json.dumps(
            {
                "photos": [Path(p).name for p in sys.argv[1:]],
                "size": "1024x1024",
                "pillow": Image.__version__,
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
