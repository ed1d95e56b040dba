"""What both decoders (TensorFlow's, :mod:`imgcls_jax.data.decode`, and Pillow's,
:mod:`imgcls_jax.data.pil_decode`) agree on: image extensions and formats, resize modes, the
result of checking a file. No TensorFlow, no Pillow here."""

from __future__ import annotations

from dataclasses import dataclass

#: File extensions listed as images (lower case), as Keras's ``image_dataset_from_directory``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_MODES = ("squash", "center_crop", "pad")
#: ImageNet-style evaluation: resize the shorter side to size / CROP_FRACTION, then crop.
CROP_FRACTION = 0.875

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_format(head: bytes) -> str | None:
    """The image format from a file's first bytes (``"jpeg"``, ``"png"``, ...), else ``None``."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


@dataclass(frozen=True)
class ImageCheck:
    """Result of :func:`check_image`: ``reason`` is ``None`` for a decodable image."""

    path: str
    reason: str | None = None
    format: str | None = None
    height: int = 0
    width: int = 0
    channels: int = 0


def read_image_file(path: str) -> tuple[bytes, str] | ImageCheck:
    """A file's bytes and format (by its first bytes), or the failing :class:`ImageCheck`:
    unreadable, empty, or not a supported image. The first step of both decoders' checks."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return ImageCheck(path, f"unreadable: {exc.strerror or exc}")
    if not data:
        return ImageCheck(path, "empty file (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        return ImageCheck(
            path, f"not a supported image (starts with {data[:8]!r}; supported: JPEG, PNG, BMP, GIF)"
        )
    return data, fmt
