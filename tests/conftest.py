"""Suite-wide settings: one compute thread per process.

The tests use tiny models, where a second thread buys nothing and, with loader workers and
subprocesses on a 2-core machine, oversubscription makes steps many times slower. The
environment variable reaches the rotnet subprocesses the tests start.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
