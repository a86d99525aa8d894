import builtins
import collections
import os
import pickle
from pathlib import Path

import pytest

from sera_training.safe_pickle import load_pickle_safely


REFS = [
    {
        "ref_id": 0,
        "ann_id": 1719310,
        "image_id": 581857,
        "category_id": 1,
        "split": "testA",
        "file_name": "COCO_train2014_000000581857_1719310.jpg",
        "sent_ids": [0, 1],
        "sentences": [
            {"sent": "the lady", "raw": "The lady", "tokens": ["the", "lady"], "sent_id": 0},
            {"sent": "woman in red", "raw": "woman in red ", "tokens": ["woman", "in", "red"], "sent_id": 1},
        ],
        "score": 0.5,
        "flags": (True, False, None),
    }
]


class RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class WritesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


class Evaluates:
    def __reduce__(self):
        return (builtins.eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_refs_round_trip(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(REFS, protocol=protocol))
    assert load_pickle_safely(path) == REFS


def test_python3_bytes_are_allowed():
    # Protocol 3+ has a bytes opcode; older protocols pickle bytes through a global (_codecs.encode), refused.
    assert load_pickle_safely(pickle.dumps([b"\x00\xff"], protocol=3)) == [b"\x00\xff"]


def test_reads_from_bytes_and_open_files(tmp_path):
    data = pickle.dumps(REFS, protocol=2)
    assert load_pickle_safely(data) == REFS
    path = tmp_path / "refs.p"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        assert load_pickle_safely(handle) == REFS


def test_python2_byte_strings_are_decoded_as_latin1():
    # Written by hand the way Python 2 pickles `str`: protocol 2 SHORT_BINSTRING, and protocol 0 STRING in a dict.
    protocol2 = b"\x80\x02]q\x00(U\x04caf\xe9q\x01e."
    protocol0 = b"(dp0\nS'sent'\np1\nS'man'\np2\ns."
    assert load_pickle_safely(protocol2) == ["caf\xe9"]
    assert load_pickle_safely(protocol0) == {"sent": "man"}


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_that_runs_a_shell_command_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    # Hide the payload inside an otherwise normal refs list, as a tampered download would.
    payload = pickle.dumps([REFS[0], {"ref_id": 1, "sentences": [RunsShellCommand(marker)]}], protocol=protocol)

    with pytest.raises(pickle.UnpicklingError, match=r"Python object \((posix|nt|os)\.system\)"):
        load_pickle_safely(payload)
    assert not marker.exists()


def test_pickle_that_writes_a_file_is_refused_and_nothing_is_written(tmp_path):
    marker = tmp_path / "written"
    payload = pickle.dumps([WritesFile(marker)], protocol=2)

    # The payload is real: the standard unpickler does create the file.
    pickle.loads(payload)[0].close()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(pickle.UnpicklingError) as error:
        load_pickle_safely(payload)
    assert "(io.open)" in str(error.value)
    assert "can run arbitrary code" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [
        # Protocol 2 writes Python 2 module names, as the REFER files would.
        (Evaluates(), r"__builtin__\.eval"),
        (collections.OrderedDict(a=1), r"collections\.OrderedDict"),
        ({1, 2}, r"__builtin__\.set"),
        (RunsShellCommand, r"test_safe_pickle\.RunsShellCommand"),
    ],
)
def test_every_global_is_refused(obj, name):
    with pytest.raises(pickle.UnpicklingError, match=name):
        load_pickle_safely(pickle.dumps(obj, protocol=2))


def test_protocol0_instance_opcode_is_refused():
    # INST (opcode "i") builds an object from a module and class name without the GLOBAL opcode.
    payload = b"(S'echo hi'\nios\nsystem\n."
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        load_pickle_safely(payload)


def test_persistent_ids_are_refused():
    payload = b"\x80\x02X\x01\x00\x00\x00aQ."  # BINPERSID with the id "a"
    with pytest.raises(pickle.UnpicklingError, match="persistent"):
        load_pickle_safely(payload)
