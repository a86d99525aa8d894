"""Load the REFER ``refs(*.p)`` pickles without letting them run code.

The REFER annotation files are pickles downloaded from the internet, and ``pickle.load`` will call any function a
pickle names. Those files only ever hold lists and dicts of strings and numbers, so we refuse every reference to a
Python global: that is the one door through which a pickle can reach a callable (``os.system``, ``builtins.eval``, a
class constructor...). ``collections.OrderedDict`` and friends are refused too; REFER files do not use them, and each
allowed global would be one more thing to audit.
"""

import io
import os
import pickle
from typing import Any, BinaryIO


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers (list, dict, tuple), str, bytes, numbers, bool and None.

    Those types come from dedicated pickle opcodes; everything else has to be looked up by name through
    ``find_class`` (or a persistent id), and both are refused with a ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"Refusing to unpickle: the file contains a Python object ({module}.{name}), and only plain lists, dicts, "
            "tuples, strings, numbers, booleans and None are allowed. Loading an object from a pickle can run "
            "arbitrary code, so this file is not treated as data. If it really comes from REFER, download it again."
        )

    def persistent_load(self, pid: Any):
        raise pickle.UnpicklingError(
            f"Refusing to unpickle: the file refers to an external persistent object ({pid!r}); plain REFER files "
            "never do."
        )


def load_pickle_safely(file: str | os.PathLike | BinaryIO | bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``file`` (a path, an open binary file, or bytes) with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` because the REFER files were written by Python 2: its byte strings must be decoded, and
    latin-1 maps every byte to a character so nothing fails half-way.
    """
    if isinstance(file, (bytes, bytearray)):
        return RestrictedUnpickler(io.BytesIO(file), encoding=encoding).load()
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle, encoding=encoding).load()
    return RestrictedUnpickler(file, encoding=encoding).load()
