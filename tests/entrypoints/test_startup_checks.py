"""Checks that stop a server early with a clear message, and the drain budget's arithmetic."""

import os
import shutil

import pytest

from sparse_lavida_vllm.entrypoints.plugin import _check_checkpoint_files
from sparse_lavida_vllm.entrypoints.shutdown import _drain_budget
from sparse_lavida_vllm.model_executor.weights import check_safetensors, read_state_dict
from tests.serving_helpers import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("startup"))


def test_a_good_checkpoint_passes(checkpoint):
    check_safetensors(checkpoint / "model.safetensors")
    _check_checkpoint_files(str(checkpoint))
    _check_checkpoint_files("some-org/some-hub-model")  # not a local folder: nothing to check here


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "json_garbage"])
def test_a_broken_safetensors_file_is_an_error_naming_the_file(checkpoint, tmp_path, damage):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"random": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b"",
                      "json_garbage": (10).to_bytes(8, "little") + b"\xff" * 10 + data[18:]}[damage])
    for check in (lambda: check_safetensors(path), lambda: read_state_dict(broken),
                  lambda: _check_checkpoint_files(str(broken))):
        with pytest.raises(ValueError) as info:  # once "OverflowError: cannot fit 'int' into an index-sized integer"
            check()
        assert str(path) in str(info.value) and "safetensors" in str(info.value)


@pytest.mark.parametrize("timeout", [1, 5, 8, 30, 120])
def test_the_drain_ends_requests_before_the_engine_is_killed_and_leaves_time_to_exit(timeout):
    deadline, engine_timeout = _drain_budget(timeout)
    assert 0 < deadline < engine_timeout < timeout
    assert timeout - engine_timeout >= min(2.0, timeout / 3) - 1e-9  # the API server's own exit
    assert deadline >= timeout / 6  # most of a long timeout is for draining
