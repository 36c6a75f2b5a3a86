"""Run by tests/test_distributed_launcher.py under run_distributed: ``ok OUT`` joins and leaves the process group
and records where randopt came from and the import path; ``fail`` fails on rank 1 only; ``hang OUT`` records each
rank's pid and never finishes."""
import json
import os
import sys
import time
from pathlib import Path


def main(mode, out=None):
    rank = int(os.environ["RANK"])
    if mode == "ok":
        import randopt
        import randopt.integrations
        from distributed import finish_distributed, start_distributed

        rank, world = start_distributed()
        if rank == 0:
            Path(out, "probe.json").write_text(json.dumps({
                "world": world, "randopt": randopt.__file__, "integrations": randopt.integrations.__file__,
                "sys_path": sys.path}))
        finish_distributed()
    elif mode == "fail":
        print(f"rank {rank} starts", flush=True)
        if rank == 1:
            raise ValueError("deliberate failure on rank 1")
    elif mode == "hang":
        Path(out, f"pid{rank}").write_text(str(os.getpid()))
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:])
