"""Suite-wide settings: one compute thread per process.

The tests use tiny models, where a second thread buys nothing and, with loader workers and
subprocesses on a 2-core machine, oversubscription makes steps many times slower. The
environment variable reaches the rotnet subprocesses the tests start.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


class _CodeRunningPayload:
    """Unpickling this runs code (it creates a marker file): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def write_malicious_checkpoint(tmp_path):
    """write(path, state, writer) saves ``state`` plus a code-running payload with torch.save
    or pickle.dump and returns the marker file that exists only if the payload ran."""

    def write(path: Path, state: dict, writer: str) -> Path:
        marker = tmp_path / "code-ran"
        state = {**state, "payload": _CodeRunningPayload(marker)}
        if writer == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))
        return marker

    return write
