"""Fault injection for the job child processes of tests/service/test_fencing.py.

Python imports `sitecustomize` at start-up from the first directory of PYTHONPATH holding one, so a
test that puts this directory there makes ONE artifact-store upload fail in the worker's training
child, as a store that stops answering would (the real stores retry, then raise StorageError):

- NNM_FAULT_PUT=after-marker: the first upload that follows a stage's completion marker (done.json);
- NNM_FAULT_PUT=<regular expression>: the first upload whose key matches it.

NNM_FAULT_FLAG names a file created when the fault fires; while it exists the fault does not fire
again, in this process or any later one (the next attempt's child), so the fault happens once.
"""

from __future__ import annotations

import os

if os.environ.get("NNM_FAULT_PUT") and os.environ.get("NNM_FAULT_FLAG"):
    import re
    from pathlib import Path

    from nnm.service.store import storage

    _spec, _flag = os.environ["NNM_FAULT_PUT"], Path(os.environ["NNM_FAULT_FLAG"])
    _after_marker = [False]

    def _fire_once() -> bool:
        try:
            fd = os.open(_flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _faulty(put):
        def put_file(self, key: str, path: Path) -> int:
            hit = _after_marker[0] if _spec == "after-marker" else re.search(_spec, key) is not None
            _after_marker[0] = key.endswith("/done.json")
            if hit and _fire_once():
                raise storage.StorageError(f"injected fault: upload of {key} failed")
            return put(self, key, path)

        return put_file

    for _cls in (storage.LocalStore, storage.S3Store):
        _cls.put_file = _faulty(_cls.put_file)
