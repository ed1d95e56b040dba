"""How examples/data/flowers_sample was made (kept for reproducibility; needs ../shared/data).

Takes the first 40 files (sorted by name) of each class of the 128x128 flowers5 set, skipping
files whose bytes also occur elsewhere in the set (flowers5 has a few exact duplicates, some
of them filed under two classes).
"""

import hashlib
import shutil
import sys
from pathlib import Path

PER_CLASS = 40


def main(source: Path, dest: Path):
    files = sorted(source.glob("*/*.jpg"))
    digests: dict[str, int] = {}
    for f in files:
        d = hashlib.sha256(f.read_bytes()).hexdigest()
        digests[d] = digests.get(d, 0) + 1
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        chosen = [
            f
            for f in sorted(class_dir.glob("*.jpg"))
            if digests[hashlib.sha256(f.read_bytes()).hexdigest()] == 1
        ]
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in chosen[:PER_CLASS]:
            shutil.copy2(f, dest / class_dir.name / f.name)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else here.parents[2] / "shared" / "data" / "flowers5",
        here / "flowers_sample",
    )
