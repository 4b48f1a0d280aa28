"""The converted-model cache is keyed by the GGUF's content: a fresh clone
(its own venv, its own copy of the file) finds the earlier conversion."""

from __future__ import annotations

import os
import shutil

import pytest

from pad_core import model_loading
from pad_core.model_loading import HASH_INDEX, content_key, convert_gguf


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "clone-a" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 << 20) + b"tail")
    return path


@pytest.fixture
def counted_hashes(monkeypatch):
    calls = []
    real = model_loading.full_hash

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(model_loading, "full_hash", counting)
    return calls


@pytest.fixture
def no_conversion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_loading.AutoModelForCausalLM, "from_pretrained", refuse)


def test_content_key_is_remembered_and_shared_by_copies(gguf, tmp_path, counted_hashes):
    cache = tmp_path / "cache"
    key = content_key(gguf, cache)
    assert key.startswith(f"{gguf.stat().st_size}-")
    assert content_key(gguf, cache) == key and len(counted_hashes) == 1  # the full hash is computed once
    assert (cache / "converted" / HASH_INDEX).is_file()
    clone = tmp_path / "clone-b" / "model.gguf"
    clone.parent.mkdir()
    shutil.copyfile(gguf, clone)  # another clone: another path, another mtime
    assert content_key(clone, cache) == key and len(counted_hashes) == 2
    assert content_key(clone, cache) == key and len(counted_hashes) == 2


def test_changed_content_changes_the_key_even_with_the_same_mtime(gguf, tmp_path):
    cache = tmp_path / "cache"
    key = content_key(gguf, cache)
    stat = gguf.stat()
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # same size, last MiB differs: the quick check sees it
    gguf.write_bytes(bytes(data))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_key(gguf, cache) != key


def test_a_fresh_clone_reuses_the_conversion(gguf, tmp_path, no_conversion):
    cache = tmp_path / "cache"
    folder = cache / "converted" / f"model-{content_key(gguf, cache)}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    clone = tmp_path / "clone-b" / "model.gguf"
    clone.parent.mkdir()
    shutil.copyfile(gguf, clone)
    assert convert_gguf(clone, cache) == folder


def test_a_path_keyed_conversion_of_an_earlier_version_is_adopted(gguf, tmp_path, no_conversion):
    cache = tmp_path / "cache"
    legacy = model_loading._path_keyed_cache_folder(gguf, cache)
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    folder = convert_gguf(gguf, cache)
    assert folder.name == f"model-{content_key(gguf, cache)}"
    assert (folder / "config.json").is_file() and legacy.resolve() == folder.resolve()  # a link for older versions
    assert convert_gguf(gguf, cache) == folder


def test_a_broken_index_is_rebuilt(gguf, tmp_path, counted_hashes):
    cache = tmp_path / "cache"
    key = content_key(gguf, cache)
    (cache / "converted" / HASH_INDEX).write_text("not json")
    assert content_key(gguf, cache) == key and len(counted_hashes) == 2
