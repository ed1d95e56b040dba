"""What a run shows and leaves behind while it trains: TensorBoard scalars and a progress bar."""

from __future__ import annotations

from pathlib import Path


class NoBoard:
    """Stands in for :class:`TensorBoard` on processes other than 0 (they write no events)."""

    def scalars(self, step: int, values: dict):
        pass

    def close(self):
        pass


class TensorBoard:
    """Scalars as TensorBoard event files in ``path`` (tensorboardX: no TensorFlow needed)."""

    def __init__(self, path: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(path))

    def scalars(self, step: int, values: dict):
        for name, value in values.items():
            if value not in ("", None):
                self._writer.add_scalar(name, float(value), step)

    def close(self):
        self._writer.close()


def progress(total_images: int, desc: str):
    """A tqdm bar counting images (``None`` without tqdm; hidden when not on a terminal)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with tensorflow-datasets
        return None
    return tqdm(total=total_images, desc=desc, unit="img", unit_scale=True, leave=False, disable=None)
