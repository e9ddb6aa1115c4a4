"""The model cache of ``mtkd serve`` on real model folders: a model is loaded once per source
and device, loaded again when its files change, and the least recently used goes first."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from helpers import untrained_model

from mtkd.errors import MTKDError
from mtkd.modelfiles.cache import ModelCache, files_stamp
from mtkd.modelfiles.model_io import WEIGHTS


@pytest.fixture
def models(tmp_path):
    return [untrained_model(tmp_path / name) for name in ("a", "b")]


def test_a_model_is_loaded_once_per_source_and_device(models, tmp_path, monkeypatch):
    cache = ModelCache()
    first = cache.load(models[0], "cpu")
    monkeypatch.chdir(tmp_path)
    assert cache.load("a", torch.device("cpu")) is first  # the same folder, named otherwise
    (tmp_path / "link").symlink_to(models[0], target_is_directory=True)
    assert cache.load(tmp_path / "link", "cpu") is first
    assert (cache.loads, cache.hits, len(cache)) == (1, 2, 1)
    assert cache.load(models[1], "cpu") is not first
    assert (cache.loads, len(cache)) == (2, 2)


def test_a_changed_model_is_loaded_again(models):
    cache = ModelCache()
    first = cache.load(models[0], "cpu")
    weights = models[0] / WEIGHTS
    before = files_stamp(models[0])
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert files_stamp(models[0]) != before
    second = cache.load(models[0], "cpu")
    assert second is not first and cache.loads == 2 and len(cache) == 1
    assert cache.load(models[0], "cpu") is second


def test_the_least_recently_used_model_goes_first(models, tmp_path):
    third = untrained_model(tmp_path / "c")
    cache = ModelCache(capacity=2)
    a = cache.load(models[0], "cpu")
    cache.load(models[1], "cpu")
    assert cache.load(models[0], "cpu") is a  # a is now the most recent
    cache.load(third, "cpu")  # b goes
    assert cache.load(models[0], "cpu") is a
    assert cache.loads == 3
    cache.load(models[1], "cpu")
    assert cache.loads == 4 and len(cache) == 2


def test_a_model_that_does_not_load_is_not_kept(tmp_path):
    cache = ModelCache()
    missing = tmp_path / "missing"
    with pytest.raises(MTKDError, match="model not found"):
        cache.load(missing, "cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mtkd_model.json").write_text("{ not json", encoding="utf-8")
    for _ in range(2):
        with pytest.raises(MTKDError) as info:
            cache.load(broken, "cpu")
        assert str(broken) in str(info.value)
    assert len(cache) == 0 and cache.loads == 0
    with pytest.raises(ValueError, match="at least one"):
        ModelCache(capacity=0)


def test_each_variant_is_prepared_once_and_kept_apart(models):
    """A model prepared for a backend (``variant``) is kept beside the plain one."""
    cache = ModelCache()
    prepared = []

    def prepare(model):
        prepared.append(model)
        return dataclasses.replace(model, metadata={**model.metadata, "prepared": True})

    plain = cache.load(models[0], "cpu")
    first = cache.load(models[0], "cpu", prepare=prepare, variant="onnxruntime")
    again = cache.load(models[0], "cpu", prepare=prepare, variant="onnxruntime")
    assert again is first and first is not plain and first.metadata["prepared"]
    assert len(prepared) == 1 and cache.load(models[0], "cpu") is plain
    assert (cache.loads, cache.hits, len(cache)) == (2, 2, 2)


def test_a_background_variant_serves_the_plain_model_until_it_is_ready(models):
    cache = ModelCache()
    prepared = []

    def prepare(model):
        prepared.append(model)
        return dataclasses.replace(model, metadata={**model.metadata, "prepared": True})

    plain = cache.load(models[0], "cpu", prepare=prepare, variant="auto", background=True)
    assert "prepared" not in plain.metadata
    for thread in cache.preparing_threads:
        thread.join(timeout=60)
    ready = cache.load(models[0], "cpu", prepare=prepare, variant="auto", background=True)
    assert ready.metadata["prepared"] and ready.network is not plain.network  # its own copy
    assert len(prepared) == 1 and cache.load(models[0], "cpu") is plain


def test_a_failed_background_preparation_leaves_the_plain_model(models):
    cache = ModelCache()

    def fail(model):
        raise RuntimeError("no backend here")

    plain = cache.load(models[0], "cpu", prepare=fail, variant="auto", background=True)
    for thread in cache.preparing_threads:
        thread.join(timeout=60)
    again = cache.load(models[0], "cpu", prepare=fail, variant="auto", background=True)
    assert again is plain and len(cache.preparing_threads) == 1  # not tried again
