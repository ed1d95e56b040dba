"""Where weight files come from, and the cache of converted parameters.

``weights='imagenet'`` resolves Keras's published file in this order:

1. the directory in ``$IMGCLS_JAX_WEIGHTS_DIR`` (a folder holding Keras's file names);
2. Keras's own cache, ``$KERAS_HOME/models`` (default ``~/.keras/models``), so files Keras
   already downloaded are reused;
3. a download from Keras's published URL into that cache, checked against its published hash
   (md5 or sha256, told apart by length as Keras's ``get_file`` does; Keras publishes none for
   MobileNetV2, whose files are then taken unchecked, as Keras takes them).

A family that publishes one file per input size (MobileNetV2: 96, 128, 160, 192 and 224 px) gets
the file of the model's input size when it is square and one of those, else the 224 px file (as
Keras, with a warning); a model with the ImageNet top must have a published size (Keras's rule).

Offline, step 3 fails with a message naming the file, its URL and where to put it.

Converted parameters are cached in ``$IMGCLS_JAX_CACHE`` (default
``$XDG_CACHE_HOME/imgcls_jax`` or ``~/.cache/imgcls_jax``) as one flat file per source file,
keyed by the source's resolved path, size and modification time. A hit skips the hash check,
the HDF5 parsing and the finiteness scan, and memory-maps the arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "IMGCLS_JAX_WEIGHTS_DIR"
ENV_CACHE = "IMGCLS_JAX_CACHE"
_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications"


class WeightsUnavailableError(FileNotFoundError):
    """Published weights could not be found locally nor downloaded; the message says what to do."""


class ChecksumError(ValueError):
    """A file claiming to be a published weight file does not have the published hash."""


@dataclass(frozen=True)
class PublishedWeights:
    """One of Keras's published ImageNet weight files and how its model expects inputs.

    ``file_hash``: Keras's published md5 (32 hex digits) or sha256 (64), or None where Keras
    publishes none. ``folder``: the URL folder (default ``arch``). ``sizes``: for a family with a
    file per input size, those sizes, and ``filename`` has a ``{size}`` field (see
    :meth:`for_size`)."""

    arch: str
    include_top: bool
    filename: str
    file_hash: str | None
    preprocessing: str = "caffe"
    folder: str | None = None
    sizes: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        return f"{_BASE_URL}/{self.folder or self.arch}/{self.filename}"

    @property
    def hash_algorithm(self) -> str:
        """``"sha256"`` for a 64-digit hash, else ``"md5"`` (Keras's ``get_file`` rule)."""
        return "sha256" if self.file_hash is not None and len(self.file_hash) == 64 else "md5"

    def for_size(self, input_shape: tuple[int, ...] | None) -> PublishedWeights:
        """The file for a model of ``input_shape`` ``(H, W, 3)``: itself for a single-file family;
        else the file of size H when H == W is a published size, or 224 with a warning (Keras's
        rule). ``ValueError`` for a model with the top and another size (Keras's message)."""
        rows = None if input_shape is None else tuple(input_shape[:2])
        sizes = self.sizes or (224,)
        size = rows[0] if rows is not None and rows[0] == rows[1] and rows[0] in sizes else 224
        if self.include_top and rows is not None and rows != (size, size):
            raise ValueError(
                f"When setting include_top=True and loading imagenet weights, input_shape should be "
                f"{(size, size, 3)} for {self.arch}; Received: input_shape={tuple(input_shape)}. "
                "Use include_top=False (a transfer head) for other sizes"
            )
        if not self.sizes:
            return self
        if rows is not None and rows != (size, size):
            log.warning(
                "%s: input_shape %s is non-square or not one of %s: loading the weights for (224, 224), "
                "as Keras does",
                self.arch, tuple(input_shape), sizes,
            )  # fmt: skip
        return replace(self, filename=self.filename.format(size=size), sizes=())


_MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)

# Names, URLs and hashes as published by keras.applications (vgg16, vgg19, resnet, mobilenet_v2).
IMAGENET = {
    (w.arch, w.include_top): w
    for w in (
        PublishedWeights(
            "vgg16", True, "vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"
        ),
        PublishedWeights(
            "vgg16",
            False,
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "6d6bbae143d832006294945121d1f1fc",
        ),
        PublishedWeights(
            "vgg19", True, "vgg19_weights_tf_dim_ordering_tf_kernels.h5", "cbe5617147190e668d6c5d5026f83318"
        ),
        PublishedWeights(
            "vgg19",
            False,
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "253f8cb515780f3b799900260a226db6",
        ),
        PublishedWeights(
            "resnet50",
            True,
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            "2cb95161c43110f7111970584f804107",
            folder="resnet",
        ),
        PublishedWeights(
            "resnet50",
            False,
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "4d473c1dd8becc155b73f8504c6f6626",
            folder="resnet",
        ),
        PublishedWeights(
            "mobilenetv2",
            True,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}.h5",
            None,
            preprocessing="tf",
            folder="mobilenet_v2",
            sizes=_MOBILENET_V2_SIZES,
        ),
        PublishedWeights(
            "mobilenetv2",
            False,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
            None,
            preprocessing="tf",
            folder="mobilenet_v2",
            sizes=_MOBILENET_V2_SIZES,
        ),
    )  # fmt: skip
}


def keras_cache_dir() -> Path:
    """Keras's download cache for application weights: ``$KERAS_HOME/models``."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def converted_cache_dir() -> Path:
    """Where converted parameters are cached (see module docstring)."""
    if ENV_CACHE in os.environ:
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "imgcls_jax"


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of the file at ``path`` by ``algorithm`` (``"md5"`` or ``"sha256"``)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    return file_digest(path, "md5", chunk)


def check_hash(path: Path, published: PublishedWeights) -> None:
    """``ChecksumError`` unless ``path`` has ``published``'s hash (nothing to check without one)."""
    if published.file_hash is None:
        log.info("%s: Keras publishes no hash for %s; not checked", path, published.filename)
        return
    algorithm = published.hash_algorithm
    found = file_digest(path, algorithm)
    if found != published.file_hash:
        raise ChecksumError(
            f"{path}: {algorithm} {found} does not match the published {algorithm} {published.file_hash} of "
            f"{published.filename}; the file is corrupt, truncated or a different file. "
            f"Delete it and download {published.url} again."
        )


#: The name before hashes other than md5 were checked.
check_md5 = check_hash


def download(published: PublishedWeights, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``published`` to ``dest`` atomically, verifying its hash (when published)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", published.url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.new(published.hash_algorithm)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(published.url, timeout=timeout) as resp:
            while block := resp.read(1 << 22):
                digest.update(block)
                out.write(block)
        if published.file_hash is not None and digest.hexdigest() != published.file_hash:
            raise ChecksumError(
                f"download of {published.url} has {published.hash_algorithm} {digest.hexdigest()}, "
                f"expected {published.file_hash}; nothing was saved. Try again."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {published.arch} (include_top={published.include_top}) are not "
            f"available locally and could not be downloaded ({exc}). Download\n  {published.url}\n"
            f"on a machine with internet ({_hash_text(published)}) and put it at\n  {dest}\n"
            f"or in the folder named by ${ENV_WEIGHTS_DIR}, or pass weights='/path/to/"
            f"{published.filename}'."
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _hash_text(published: PublishedWeights) -> str:
    if published.file_hash is None:
        return "Keras publishes no hash for it"
    return f"{published.hash_algorithm} {published.file_hash}"


def resolve_imagenet(
    arch: str, include_top: bool, *, input_shape: tuple[int, ...] | None = None, allow_download: bool = True
) -> tuple[Path, PublishedWeights]:
    """Find (or download) Keras's ImageNet file for ``arch``; see the module docstring.
    ``input_shape``: the model's ``(H, W, 3)``, which picks the file of families with one per
    size and is checked against the sizes the top was trained at (default: Keras's default size)."""
    try:
        published = IMAGENET[(arch, include_top)].for_size(input_shape)
    except KeyError:
        raise ValueError(f"no published ImageNet weights for {arch!r}") from None
    candidates = []
    if os.environ.get(ENV_WEIGHTS_DIR):
        candidates.append(Path(os.environ[ENV_WEIGHTS_DIR]).expanduser() / published.filename)
    candidates.append(keras_cache_dir() / published.filename)
    for path in candidates:
        if path.is_file():
            return path, published
    if not allow_download:
        raise WeightsUnavailableError(
            f"{published.filename} not found (looked in {', '.join(map(str, candidates))}); "
            f"download {published.url} ({_hash_text(published)}) and put it in one of those places."
        )
    return download(published, candidates[-1]), published


# --- converted-parameter cache ------------------------------------------------------------

_MAGIC = b"IMGCLSJAX-PARAMS-1\n"
_ALIGN = 64


def cache_path(source: Path) -> Path:
    """The cache file for ``source``: its stem plus a key of path, size and mtime."""
    source = source.resolve()
    stat = source.stat()
    key = hashlib.sha1(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{_MAGIC!r}".encode()).hexdigest()
    return converted_cache_dir() / f"{source.stem}-{key[:16]}.params"


def save_converted(path: Path, layers: dict[str, list[np.ndarray]], meta: dict) -> None:
    """Write ``layers`` (name -> arrays) to ``path`` atomically in a flat memory-mappable file."""
    entries, offset = [], 0
    for name, arrays in layers.items():
        shapes = []
        for array in arrays:
            shapes.append([list(array.shape), offset])
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
        entries.append([name, shapes])
    header = json.dumps({"layers": entries, "meta": meta, "data_bytes": offset}).encode()
    start = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-{'?' * 16}.params"):
        stale.unlink(missing_ok=True)  # conversions of earlier versions of the same file
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for (_, shapes), arrays in zip(entries, layers.values()):
                for (_, off), array in zip(shapes, arrays):
                    f.seek(start + off)
                    f.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
            f.truncate(start + offset)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_converted(path: Path) -> tuple[dict[str, list[np.ndarray]], dict] | None:
    """Memory-map a cache file written by :func:`save_converted`; ``None`` if absent or damaged."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("bad magic")
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        start = -(-(len(_MAGIC) + 8 + header_len) // _ALIGN) * _ALIGN
        if path.stat().st_size != start + header["data_bytes"]:
            raise ValueError("size does not match its header (truncated?)")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(header["data_bytes"],))
        layers = {}
        for name, shapes in header["layers"]:
            layers[name] = [
                data[off : off + 4 * int(np.prod(shape))].view(np.float32).reshape(shape)
                for shape, off in shapes
            ]
        return layers, header["meta"]
    except (ValueError, KeyError, OSError) as exc:
        log.warning("ignoring damaged weight cache %s (%s); converting again", path, exc)
        path.unlink(missing_ok=True)
        return None
