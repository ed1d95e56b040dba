"""Where weight files come from, and the cache of converted parameters.

``weights='imagenet'`` resolves Keras's published file in this order:

1. the directory in ``$IMGCLS_JAX_WEIGHTS_DIR`` (a folder holding Keras's file names);
2. Keras's own cache, ``$KERAS_HOME/models`` (default ``~/.keras/models``), so files Keras
   already downloaded are reused;
3. a download from Keras's published URL into that cache, checked against its published hash
   (md5 or sha256, told apart by length as Keras's ``get_file`` does; Keras publishes none for
   MobileNetV2, whose files are then taken unchecked, as Keras takes them).

A model with the ImageNet top must have the input size the top was trained at (Keras's rule:
224, EfficientNet's default size per variant, one of MobileNetV2's sizes). A family that
publishes one file per input size (MobileNetV2: 96, 128, 160, 192 and 224 px) gets the file of
the model's input size when it is square and one of those, else the 224 px file (as Keras, with
a warning).

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
    publishes none. ``folder``: the URL folder under ``base_url`` (default ``arch``; ``""`` for
    none). ``sizes``: the input sizes its top was trained at (the last is the default); for a
    family with a file per size ``filename`` has a ``{size}`` field (see :meth:`for_size`).
    ``remote_name``: the file's name at the URL where Keras caches it under another
    (``filename``; NASNet's ``NASNet-mobile.h5`` is cached as ``nasnet_mobile.h5``)."""

    arch: str
    include_top: bool
    filename: str
    file_hash: str | None
    preprocessing: str = "caffe"
    folder: str | None = None
    base_url: str = _BASE_URL
    sizes: tuple[int, ...] = (224,)
    #: Keras's MobileNetV3 loads its files (made at 224) at any input size, the top's too, and
    #: only warns; the other families' tops take only ``sizes``.
    top_any_size: bool = False
    remote_name: str | None = None

    @property
    def url(self) -> str:
        folder = self.arch if self.folder is None else self.folder
        return "/".join(p for p in (self.base_url, folder, self.remote_name or self.filename) if p)

    @property
    def hash_algorithm(self) -> str:
        """``"sha256"`` for a 64-digit hash, else ``"md5"`` (Keras's ``get_file`` rule)."""
        return "sha256" if self.file_hash is not None and len(self.file_hash) == 64 else "md5"

    def for_size(self, input_shape: tuple[int, ...] | None) -> PublishedWeights:
        """The file for a model of ``input_shape`` ``(H, W, 3)`` (None: the default size), with
        Keras's rules: a model with the top must have a size in ``sizes`` (``ValueError`` with
        Keras's message otherwise); of a family with a file per size, the file of size H when
        H == W is one of them, else the default size's (with a warning, as Keras)."""
        rows = (self.sizes[-1],) * 2 if input_shape is None else tuple(input_shape[:2])
        size = rows[0] if rows[0] == rows[1] and rows[0] in self.sizes else self.sizes[-1]
        if self.top_any_size and rows != (size, size):
            log.warning(
                "%s: `input_shape` is non-square, or `rows` is not %s: weights for input shape %s "
                "are loaded, as Keras does", self.arch, size, (size, size),
            )  # fmt: skip
        elif self.include_top and rows != (size, size):
            raise ValueError(
                "When setting `include_top=True` and loading `imagenet` weights, `input_shape` should "
                f"be {(size, size, 3)} for {self.arch}; received input_shape={tuple(input_shape)} (Keras's "
                f"rule for its ImageNet top): use input_shape={(size, size, 3)}, or include_top=False "
                "for another size"
            )
        if "{size}" not in self.filename:
            return self
        if rows != (size, size):
            log.warning(
                "%s: input_shape %s is non-square or not one of %s: loading the weights for %s, as "
                "Keras does", self.arch, tuple(input_shape), self.sizes, (size, size),
            )  # fmt: skip
        return replace(self, filename=self.filename.format(size=size), sizes=(size,))


#: keras.applications.efficientnet's ``WEIGHTS_HASHES`` (md5 of the top and the notop file),
#: and each variant's default input size (the size its top was trained at).
_EFFICIENTNET_MD5 = {
    "b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d", 224),
    "b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432", 240),
    "b2": ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39", 260),
    "b3": ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226", 300),
    "b4": ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba", 380),
    "b5": ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f", 456),
    "b6": ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743", 528),
    "b7": ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a", 600),
}
#: MobileNetV2 (alpha 1.0): one file per input size, no published hash.
_MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)


def _efficientnet_files() -> list[PublishedWeights]:
    """EfficientNet's files sit at the root of ``keras-applications/`` (not under
    ``tensorflow/``), named ``efficientnetb0.h5`` / ``efficientnetb0_notop.h5``; the model
    normalises its inputs itself (preprocessing ``"none"``)."""
    return [
        PublishedWeights(
            f"efficientnet{v}",
            top,
            f"efficientnet{v}{'' if top else '_notop'}.h5",
            md5[0 if top else 1],
            preprocessing="none",
            folder="",
            base_url="https://storage.googleapis.com/keras-applications",
            sizes=(md5[2],),
        )  # fmt: skip
        for v, md5 in _EFFICIENTNET_MD5.items()
        for top in (True, False)
    ]


#: keras.applications.resnet's ``WEIGHTS_HASHES`` (md5 of the top and the notop file); the v2
#: files expect "tf" preprocessing, the v1 files "caffe".
_RESNET_MD5 = {
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50v2": ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
}


def _resnet_mobilenet_files() -> list[PublishedWeights]:
    """keras.applications.resnet's files (``<arch>_weights_tf_dim_ordering_tf_kernels[_notop].h5``,
    md5) and mobilenet_v2's, one per input size (``..._1.0_{size}.h5``,
    ``..._1.0_{size}_no_top.h5``), without a hash."""
    stem = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}"
    return [
        *(
            PublishedWeights(
                arch,
                top,
                f"{arch}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5",
                md5[0 if top else 1],
                preprocessing="tf" if arch.endswith("v2") else "caffe",
                folder="resnet",
            )  # fmt: skip
            for arch, md5 in _RESNET_MD5.items()
            for top in (True, False)
        ),
        *(
            PublishedWeights(
                "mobilenetv2",
                top,
                f"{stem}{'' if top else '_no_top'}.h5",
                None,
                preprocessing="tf",
                folder="mobilenet_v2",
                sizes=_MOBILENET_V2_SIZES,
            )  # fmt: skip
            for top in (True, False)
        ),
    ]


#: keras.applications.convnext's ``WEIGHTS_HASHES`` (sha256 of the top and the notop file), by
#: the Keras model's name (the registry's without the underscore).
_CONVNEXT_SHA256 = {
    "convnext_tiny": (
        "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
    ),
    "convnext_small": (
        "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
        "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
    ),
    "convnext_base": (
        "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
        "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
    ),
    "convnext_large": (
        "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
        "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
    ),
    "convnext_xlarge": (
        "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
        "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
    ),
}


#: keras.applications.efficientnet_v2's ``WEIGHTS_HASHES`` (md5 of the top and the notop file), by
#: its ``weights_name``, with the Keras model's name and its default input size.
_EFFICIENTNET_V2_MD5 = {
    "b0": ("efficientnetv2-b0", 224, "21ecbf6da12460d5c40bb2f29ceb2188", "893217f2bb855e2983157299931e43ff"),
    "b1": ("efficientnetv2-b1", 240, "069f0534ff22adf035c89e2d9547a9dc", "0e80663031ca32d657f9caa404b6ec37"),
    "b2": ("efficientnetv2-b2", 260, "424e49f28180edbde1e94797771950a7", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "b3": ("efficientnetv2-b3", 300, "1f1fc43bd98a6e4fd8fdfd551e02c7a0", "f6abf7b5849ac99a89b50dd3fd532856"),
    "s": ("efficientnetv2-s", 384, "e1d88a8495beba45748fedd0cecbe016", "af0682fb74e8c54910f2d4393339c070"),
    "m": ("efficientnetv2-m", 480, "a3bf6aa3276309f4fc6a34aa114c95cd", "1b8dc055df72dde80d614482840fe342"),
    "l": ("efficientnetv2-l", 480, "27e6d408b53c7ebc868fefa357689935", "b0b66b5c863aef5b46e8608fe1711615"),
}
#: keras.applications.mobilenet_v3's ``WEIGHTS_HASHES`` (md5 of the top and the ``_no_top_v2``
#: file), by Keras's ``model_name`` (type, minimalistic, alpha); the registry's key beside it.
_MOBILENET_V3_MD5 = {
    "large_224_0.75_float": (
        "mobilenetv3large_0.75", "765b44a33ad4005b3ac83185abf1d0eb", "40af19a13ebea4e2ee0c676887f69a2e",
    ),
    "large_224_1.0_float": (
        "mobilenetv3large", "59e551e166be033d707958cf9e29a6a7", "07fb09a5933dd0c8eaafa16978110389",
    ),
    "large_minimalistic_224_1.0_float": (
        "mobilenetv3large_minimalistic",
        "675e7b876c45c57e9e63e6d90a36599c",
        "ec5221f64a2f6d1ef965a614bdae7973",
    ),
    "small_224_0.75_float": (
        "mobilenetv3small_0.75", "cb65d4e5be93758266aa0a7f2c6708b7", "ebdb5cc8e0b497cd13a7c275d475c819",
    ),
    "small_224_1.0_float": (
        "mobilenetv3small", "8768d4c2e7dee89b9d02b2d03d65d862", "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
    "small_minimalistic_224_1.0_float": (
        "mobilenetv3small_minimalistic",
        "99cd97fb2fcdad2bf028eb838de69e37",
        "cde8136e733e811080d9fcd8a252f7e4",
    ),
}  # fmt: skip


def _efficientnet_v2_files() -> list[PublishedWeights]:
    """EfficientNetV2's files (``efficientnet_v2/efficientnetv2-b0.h5``, ``..._notop.h5``); the
    model rescales (and for B0-B3 normalises) its inputs itself."""
    return [
        PublishedWeights(
            f"efficientnetv2{v}",
            top,
            f"{name}{'' if top else '_notop'}.h5",
            (top_md5 if top else notop_md5),
            preprocessing="torch" if v.startswith("b") else "tf128",
            folder="efficientnet_v2",
            sizes=(size,),
        )  # fmt: skip
        for v, (name, size, top_md5, notop_md5) in _EFFICIENTNET_V2_MD5.items()
        for top in (True, False)
    ]


def _mobilenet_v3_files() -> list[PublishedWeights]:
    """MobileNetV3's files (``mobilenet_v3/weights_mobilenet_v3_<model_name>.h5`` and
    ``..._no_top_v2.h5``), made at 224 and loaded at any size (:attr:`PublishedWeights.top_any_size`);
    keyed by the model's ``imagenet_key`` (width and minimalism pick the file)."""
    return [
        PublishedWeights(
            key,
            top,
            f"weights_mobilenet_v3_{name}{'' if top else '_no_top_v2'}.h5",
            (top_md5 if top else notop_md5),
            preprocessing="tf",
            folder="mobilenet_v3",
            top_any_size=True,
        )  # fmt: skip
        for name, (key, top_md5, notop_md5) in _MOBILENET_V3_MD5.items()
        for top in (True, False)
    ]


def _convnext_files() -> list[PublishedWeights]:
    """ConvNeXt's files (``convnext/convnext_tiny.h5``, ``..._notop.h5``); the model normalises
    with the ImageNet mean and standard deviation itself (``"torch"``)."""
    return [
        PublishedWeights(
            name.replace("_", ""),
            top,
            f"{name}{'' if top else '_notop'}.h5",
            sha[0 if top else 1],
            preprocessing="torch",
            folder="convnext",
        )  # fmt: skip
        for name, sha in _CONVNEXT_SHA256.items()
        for top in (True, False)
    ]


#: The files of keras.applications' densenet, xception, inception_v3 and inception_resnet_v2,
#: at ``.../tensorflow/keras-applications/<folder>/<stem>_weights_tf_dim_ordering_tf_kernels.h5``
#: (``..._notop.h5`` without the top): arch -> (folder, stem, md5 of the top file, of the notop
#: file, preprocessing, the size the top was trained at).
_FAMILY_FILES = {
    "densenet121": ("densenet", "densenet121", "9d60b8095a5708f2dcce2bca79d332c7",
                    "30ee3e1110167f948a6b9946edeeb738", "torch", 224),
    "densenet169": ("densenet", "densenet169", "d699b8f76981ab1b30698df4c175e90b",
                    "b8c4d4c20dd625c148057b9ff1c1176b", "torch", 224),
    "densenet201": ("densenet", "densenet201", "1ceb130c1ea1b78c3bf6114dbdfd8807",
                    "c13680b51ded0fb44dff2d8f86ac8bb1", "torch", 224),
    "xception": ("xception", "xception", "0a58e3b7378bc2990ea3b43d5981f1f6",
                 "b0042744bf5b25fce3cb969f33bebb97", "tf", 299),
    "inceptionv3": ("inception_v3", "inception_v3", "9a0d58056eeedaa3f26cb7ebd46da564",
                    "bcbd6486424b2319ff4ef7d526e38f63", "tf", 299),
    "inceptionresnetv2": ("inception_resnet_v2", "inception_resnet_v2", "e693bd0210a403b3192acc6073ad2e96",
                          "d19885ff4a710c122648d3b5c3b684e4", "tf", 299),
}  # fmt: skip


def _family_files() -> list[PublishedWeights]:
    """:data:`_FAMILY_FILES` as :class:`PublishedWeights`."""
    return [
        PublishedWeights(
            arch,
            top,
            f"{stem}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5",
            top_md5 if top else notop_md5,
            preprocessing=mode,
            folder=folder,
            sizes=(size,),
        )
        for arch, (folder, stem, top_md5, notop_md5, mode, size) in _FAMILY_FILES.items()
        for top in (True, False)
    ]


#: MobileNet (v1): a file per width (Keras's ``alpha_text``) and input size, no published hash.
_MOBILENET_ALPHAS = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}


def _mobilenet_v1_files() -> list[PublishedWeights]:
    """keras.applications.mobilenet's files, ``mobilenet_<alpha>_<size>_tf[_no_top].h5``, keyed
    by the model's ``imagenet_key`` (``"mobilenet"``, ``"mobilenet_0.75"``, ...)."""
    return [
        PublishedWeights(
            "mobilenet" if alpha == 1.0 else f"mobilenet_{alpha}",
            top,
            f"mobilenet_{text}_{{size}}_tf{'' if top else '_no_top'}.h5",
            None,
            preprocessing="tf",
            folder="mobilenet",
            sizes=(128, 160, 192, 224),
        )
        for alpha, text in _MOBILENET_ALPHAS.items()
        for top in (True, False)
    ]


#: NASNet: (Keras's cache name, the name at the URL, md5) of the top and the notop file, the size
#: the top was trained at.
_NASNET_FILES = {
    "nasnetmobile": (
        ("nasnet_mobile.h5", "NASNet-mobile.h5", "020fb642bf7360b370c678b08e0adf61"),
        ("nasnet_mobile_no_top.h5", "NASNet-mobile-no-top.h5", "1ed92395b5b598bdda52abe5c0dbfd63"),
        224,
    ),
    "nasnetlarge": (
        ("nasnet_large.h5", "NASNet-large.h5", "11577c9a518f0070763c2b964a382f17"),
        ("nasnet_large_no_top.h5", "NASNet-large-no-top.h5", "d81d89dc07e6e56530c4e77faddd61b5"),
        331,
    ),
}  # fmt: skip


def _nasnet_files() -> list[PublishedWeights]:
    """keras.applications.nasnet's files (``.../nasnet/NASNet-mobile.h5``, ...)."""
    return [
        PublishedWeights(
            arch, top, cached, md5, preprocessing="tf", folder="nasnet", sizes=(size,), remote_name=remote
        )
        for arch, (top_file, notop_file, size) in _NASNET_FILES.items()
        for top, (cached, remote, md5) in ((True, top_file), (False, notop_file))
    ]


# Names, URLs and hashes as published by keras.applications (vgg16, vgg19, efficientnet, resnet,
# mobilenet_v2, convnext, efficientnet_v2, mobilenet_v3, densenet, xception, inception_v3,
# inception_resnet_v2, mobilenet, nasnet).
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
        *_efficientnet_files(),
        *_resnet_mobilenet_files(),
        *_convnext_files(),
        *_efficientnet_v2_files(),
        *_mobilenet_v3_files(),
        *_family_files(),
        *_mobilenet_v1_files(),
        *_nasnet_files(),
    )
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
    """``ChecksumError`` unless the file at ``path`` has ``published``'s hash (nothing to check
    where Keras publishes none)."""
    if published.file_hash is None:
        log.info("%s: Keras publishes no hash for %s; not checked", path, published.filename)
        return
    algorithm = published.hash_algorithm
    found = file_digest(path, algorithm)
    if found != published.file_hash:
        raise ChecksumError(
            f"{path}: {algorithm} {found} does not match the published {algorithm} {published.file_hash} "
            f"of {published.filename}; the file is corrupt, truncated or a different file. "
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
            f"on a machine with internet ({_hash_text(published)}) and put it "
            f"at\n  {dest}\n"
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
    ``input_shape``: the model's ``(H, W, 3)``, checked against the sizes the top was trained at
    and picking the file of families with one per size (default: the default size)."""
    if (arch, include_top) not in IMAGENET:
        raise ValueError(f"no published ImageNet weights for {arch!r}")
    published = IMAGENET[(arch, include_top)].for_size(input_shape)
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
            f"download {published.url} ({_hash_text(published)}) and put it in "
            "one of those places."
        )
    return download(published, candidates[-1]), published


# --- converted-parameter cache ------------------------------------------------------------

_MAGIC = b"IMGCLSJAX-PARAMS-1\n"
_ALIGN = 64


#: ``weights`` choices of :meth:`imgcls_jax.TrainConfig.recipe` (and ``imgcls-jax train --weights``)
#: besides a path.
WEIGHT_CHOICES = ("auto", "imagenet", "none")


def resolve_weights_choice(choice: str, model: str) -> str | None:
    """``TrainConfig.weights`` for a recipe's ``weights`` ``choice``: ``"auto"`` (``"imagenet"``
    when Keras's file resolves, else None with a loud warning in the log: the run trains from
    scratch), ``"imagenet"`` (:class:`WeightsUnavailableError` / :class:`ChecksumError` if it
    cannot be had), ``"none"`` (None) or a path to a Keras weight file (as given)."""
    if choice == "none":
        return None
    if choice not in ("auto", "imagenet"):
        return choice
    try:
        resolve_imagenet(model, include_top=False)
        return "imagenet"
    except (WeightsUnavailableError, ChecksumError) as exc:
        if choice == "imagenet":
            raise
        banner = "=" * 78
        log.warning(
            "\n%s\nImageNet weights are NOT available, so this run trains %s FROM SCRATCH.\n"
            "Expect far lower accuracy than transfer learning. Why:\n%s\n%s",
            banner, model, exc, banner,
        )  # fmt: skip
        return None


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
