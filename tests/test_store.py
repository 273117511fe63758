import os
import signal
import subprocess
import sys
import time

import pytest

from engine import store
from engine.errors import StoreError


@pytest.mark.parametrize("root", ["memory://storetest", None])
def test_read_write_list(tmp_path, root):
    root = root or str(tmp_path)
    store.write_json(store.join(root, "a", "x.json"), {"k": 1})
    store.write_bytes(store.join(root, "a", "y.bin"), b"abc")
    assert store.exists(store.join(root, "a", "x.json"))
    assert store.read_json(store.join(root, "a", "x.json")) == {"k": 1}
    assert store.listdir(store.join(root, "a")) == ["x.json", "y.bin"]
    m = store.write_manifest(store.join(root, "a"), {"stage": "t"})
    assert set(m["files"]) == {"x.json", "y.bin"} and m["files"]["y.bin"]["bytes"] == 3
    assert store.read_manifest(store.join(root, "a"), verify=True)["stage"] == "t"
    store.write_bytes(store.join(root, "a", "y.bin"), b"abd")
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read_manifest(store.join(root, "a"), verify=True)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        store.read_bytes(str(tmp_path / "nope"))


WRITER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from engine import store
with store.atomic_open(sys.argv[1], "wb") as f:
    f.write(b"new" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_writer_leaves_no_partial_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target), root], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    # The new bytes exist on disk under a temporary name only.
    assert any(store.is_temporary(n) for n in os.listdir(tmp_path))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert target.read_bytes() == b"old"
    assert store.listdir(str(tmp_path)) == ["data.bin"]


def test_check_writable_fails_early(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError):
        store.check_writable(str(f / "sub"))
