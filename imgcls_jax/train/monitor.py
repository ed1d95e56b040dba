"""What a run shows and leaves behind while it trains: TensorBoard scalars and a progress bar."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class NoBoard:
    """Stands in for :class:`TensorBoard` on processes other than 0 (they write no events)."""

    def scalars(self, step: int, values: dict):
        pass

    def close(self):
        pass


class TensorBoard:
    """Scalars as TensorBoard event files in ``path`` (tensorboardX: no TensorFlow needed)."""

    def __init__(self, path: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # a machine with only the accelerator stack (e.g. no tensorboardX)
            log.warning(
                "tensorboardX is not installed: no TensorBoard events in %s (metrics.csv has them)", path
            )
            self._writer = None
            return
        self._writer = SummaryWriter(str(path))

    def scalars(self, step: int, values: dict):
        if self._writer is None:
            return
        for name, value in values.items():
            if value not in ("", None):
                self._writer.add_scalar(name, float(value), step)

    def close(self):
        if self._writer is not None:
            self._writer.close()


def progress(total_images: int, desc: str):
    """A tqdm bar counting images (``None`` without tqdm; hidden when not on a terminal)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with tensorflow-datasets
        return None
    return tqdm(total=total_images, desc=desc, unit="img", unit_scale=True, leave=False, disable=None)
