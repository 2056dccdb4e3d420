"""Holds a run directory's lock for a minute: `python hold_run_lock.py RUN_DIR` prints "locked"
once it holds it. A second training into RUN_DIR meanwhile must stop with one line."""

import sys
import time
from pathlib import Path

from debiformer.engine.rundir import open_run

HOLD_RUN_LOCK = Path(__file__).resolve()

if __name__ == "__main__":
    with open_run(Path(sys.argv[1]), is_main=True):
        print("locked", flush=True)
        time.sleep(60)
