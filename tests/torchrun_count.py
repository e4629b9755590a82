"""Count torchrun runs that fail after finishing (not collected by pytest).

    python tests/torchrun_count.py 100            # from the project root

Runs `torchrun --standalone --nproc_per_node 2 bgpo.py --samples 2 --steps 2
--eval-every 2` that many times: odd runs on a cold warm-start cache (rank 0
trains it), even runs on a warm one with --out. A run fails when torchrun
exits non-zero; the line of each failure is printed, then the count.
"""
import os
import subprocess
import sys
import tempfile

COMMAND = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bgpo.py", "--samples", "2", "--steps", "2", "--eval-every", "2"]

def main(runs):
    failed = {"cold cache": [0, 0], "warm cache, --out": [0, 0]}
    with tempfile.TemporaryDirectory() as tmp:
        warm = os.path.join(tmp, "warm")
        for run in range(runs):
            cold = run % 2 == 0
            cache = os.path.join(tmp, f"cold{run}") if cold else warm
            extra = [] if cold else ["--out", os.path.join(tmp, f"out{run}")]
            done = subprocess.run(COMMAND + extra, capture_output=True, text=True,
                                  env=dict(os.environ, BGPO_CACHE=cache))
            kind = "cold cache" if cold else "warm cache, --out"
            failed[kind][1] += 1
            if done.returncode != 0:
                failed[kind][0] += 1
                why = [line for line in (done.stdout + done.stderr).splitlines()
                       if "terminate" in line or "exitcode" in line or "Error" in line][:2]
                print(f"run {run + 1} ({kind}): exit {done.returncode}: {' | '.join(why)}",
                      flush=True)
    for kind, (bad, total) in failed.items():
        print(f"{kind}: {bad} of {total} failed")
    print(f"in all: {sum(b for b, _ in failed.values())} of {runs} failed")

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
