"""Build the oneDNN convolution library (``onednn_conv.cc``) once per machine, into a cache folder.

Nothing here runs on ``import imgcls_jax``: :func:`library_path` is called the first time a CPU
convolution asks for ``conv_impl="onednn"`` or ``"auto"`` (:mod:`imgcls_jax.native.onednn`), or
ahead of time with ``python -m imgcls_jax.native.build``.

What it needs, else :class:`NativeUnavailable` says which is missing and what to do:

* oneDNN from PyPI, the CPU build with GNU OpenMP: ``onednn-cpu-gomp`` (``libdnnl.so.3``) and
  ``onednn-devel-cpu-gomp`` (headers); dependencies of imgcls-jax on x86-64 Linux.
* a C++17 compiler: ``$CXX``, else ``g++``, else ``c++`` on the ``PATH``.
* XLA's FFI headers, shipped with jaxlib (``jax.ffi.include_dir()``).

The library is cached as ``<cache>/libimgcls_onednn-<key>.so``; ``<key>`` hashes the source, the
flags, the oneDNN version and location, the compiler's version and jaxlib's version, so a stale
build is never loaded. ``<cache>``: ``$IMGCLS_JAX_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/imgcls_jax/native`` (``~/.cache/imgcls_jax/native``). Concurrent first uses
(several test processes) take a file lock, and each build goes to a temporary file renamed into
place atomically, so no process ever loads a half-written library.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("onednn_conv.cc")
#: The PyPI distributions of oneDNN this builds against: the library and its headers.
ONEDNN_DIST, ONEDNN_DEVEL_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden", "-Wno-return-type")
BUILD_TIMEOUT_S = 600


class NativeUnavailable(RuntimeError):
    """The oneDNN library cannot be built or loaded here; the message says why and what to do."""


@dataclass(frozen=True)
class OneDNN:
    """Where the installed oneDNN is: ``lib_dir`` holds ``libdnnl.so.3``, ``include_dir``
    ``oneapi/dnnl/dnnl.hpp``."""

    version: str
    lib_dir: Path
    include_dir: Path


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise NativeUnavailable(
            f"the PyPI package {dist!r} is not installed (pip install {ONEDNN_DIST} {ONEDNN_DEVEL_DIST}; "
            "it is a dependency of imgcls-jax on x86-64 Linux)"
        ) from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate()).resolve()
    raise NativeUnavailable(f"the package {dist!r} has no file ending in {suffix!r}: reinstall it")


def locate_onednn() -> OneDNN:
    """The installed oneDNN (library and headers), or :class:`NativeUnavailable`."""
    lib = _dist_file(ONEDNN_DIST, "/libdnnl.so.3")
    header = _dist_file(ONEDNN_DEVEL_DIST, "/oneapi/dnnl/dnnl.hpp")
    version = importlib.metadata.version(ONEDNN_DIST)
    return OneDNN(version, lib.parent, header.parents[2])


def compiler() -> tuple[str, str]:
    """``(path, first line of --version)`` of the C++ compiler, or :class:`NativeUnavailable`."""
    name = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    path = shutil.which(name) if name else None
    if not path:
        raise NativeUnavailable(
            f"no C++ compiler found (CXX={os.environ.get('CXX')!r}, no g++ or c++ on PATH): install one "
            "(e.g. apt-get install g++) to build the oneDNN convolutions"
        )
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"the C++ compiler {path} does not run: {error}") from None
    return path, out.stdout.splitlines()[0] if out.stdout else "unknown"


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("IMGCLS_JAX_NATIVE_CACHE"):
        return Path(os.environ["IMGCLS_JAX_NATIVE_CACHE"])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "imgcls_jax" / "native"


def _command(cxx: str, onednn: OneDNN, ffi_include: str, out: Path) -> list[str]:
    return [
        cxx, *FLAGS, f"-I{ffi_include}", f"-I{onednn.include_dir}", str(SOURCE), "-o", str(out),
        f"-L{onednn.lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{onednn.lib_dir}",
    ]  # fmt: skip


def library_path() -> Path:
    """The built library for this source, oneDNN, compiler and jaxlib: from the cache, or built
    now (seconds to a minute, once). Raises :class:`NativeUnavailable` saying why it cannot be."""
    import jax
    import jaxlib

    onednn = locate_onednn()
    cxx, cxx_version = compiler()
    ffi_include = jax.ffi.include_dir()
    key_text = "\n".join([
        hashlib.sha256(SOURCE.read_bytes()).hexdigest(), " ".join(FLAGS), onednn.version, str(onednn.lib_dir),
        cxx, cxx_version, jaxlib.__version__, sys.platform,
    ])  # fmt: skip
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    folder = cache_dir()
    path = folder / f"libimgcls_onednn-{key}.so"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait, then find it
            if not path.is_file():
                _build(_command(cxx, onednn, ffi_include, path), path)
    except OSError as error:
        raise NativeUnavailable(f"cannot write the oneDNN library into {folder}: {error}") from None
    return path


def _build(command: list[str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    command = [tmp if c == str(path) else c for c in command]
    log.info("building the oneDNN convolution library (once): %s", path)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise NativeUnavailable(f"building {SOURCE.name} failed ({' '.join(command)}):\n{tail}")
        os.replace(tmp, path)  # atomic: other processes see no file or the whole file
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"building {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    """``python -m imgcls_jax.native.build``: build (or find) the library and print its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(library_path())
    except NativeUnavailable as error:
        print(f"not available: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
