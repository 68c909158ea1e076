"""Run a script as ``python SCRIPT ARGS...`` would, then leave the process with ``os._exit``:
the multi-process tests' launcher (:func:`integrations_support.run_script`).

Why: a gloo rank whose work is done can still abort while the interpreter finalises ("terminate
called without an active exception", SIGABRT), when objects holding process-group state (a
``DistributedDataParallel`` reducer, a framework's accelerator) are freed during finalisation;
upstream: pytorch/pytorch#190489 and the abandoned pytorch/pytorch#179291. It hit two of our
full-suite runs, once each (a HF Trainer worker in CI, a DDP worker here; each after destroying its
process group; the DDP one not reproduced in 25 reruns of its test alone). Skipping finalisation removes that source of flakiness
and nothing else: the script's exit status (its SystemExit code, 1 for an uncaught exception with
its traceback printed) is kept, and everything a test checks is written before the script ends.
"""

import os
import runpy
import sys
import traceback


def main() -> None:
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)            # as `python script.py` sets it
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:                            # noqa: BLE001 - reported, then exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
