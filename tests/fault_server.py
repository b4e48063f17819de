"""``python -m tests.fault_server --config PATH``: GenServe whose workers take fault-injection markers."""

from __future__ import annotations

import sys

from genserve.__main__ import main
from tests.fault_worker import run_faulty_worker

if __name__ == "__main__":
    sys.exit(main(worker_target=run_faulty_worker))
