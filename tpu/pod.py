"""Create, set up, run on, watch and delete a Cloud TPU VM slice with gcloud.

    python tpu/pod.py create  --name=run1 --zone=us-central2-b --accelerator=v4-128 --queued --spot
    python tpu/pod.py install --name=run1 --zone=us-central2-b
    python tpu/pod.py launch  --name=run1 --zone=us-central2-b -- \\
        --gin_file=experiments/my_run.gin --gin_file=mesh/v4_128.gin --gin.MODEL_DIR=/mnt/run
    python tpu/pod.py logs    --name=run1 --zone=us-central2-b
    python tpu/pod.py stop    --name=run1 --zone=us-central2-b   # checkpoint and exit
    python tpu/pod.py delete  --name=run1 --zone=us-central2-b --queued
    python tpu/pod.py supervise --name=run1 --zone=us-central2-b --accelerator=v4-128 --queued \
        --spot -- --gin_file=experiments/my_run.gin --gin_file=mesh/v4_128.gin --gin.MODEL_DIR=...

Run it from the repository root. `--dry-run` prints the exact commands instead of running
them. `install` copies this checkout (`git archive HEAD`) to every worker and installs it with
the pinned dependencies and `jax[tpu]`; `launch` starts `polyglot-jax train` on all workers
at once (JAX finds the other hosts itself). `supervise` does create, install and launch, then
watches: when the slice is preempted (spot capacity reclaimed, a queued resource suspended) or
the job exits on SIGTERM, it recreates the slice and launches again; train resumes from the
last checkpoint in MODEL_DIR (on storage that outlives the slice, e.g. gs://).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

RUNTIME_VERSION = "tpu-ubuntu2204-base"  # The TPU VM image for v4 slices.
JAX_VERSION = "0.10.2"  # pyproject.toml's pin; jax[tpu] brings the matching libtpu.
ARCHIVE = "polyglot_jax.tar.gz"
REMOTE_DIR = "~/polyglot_jax"
LOG = "~/polyglot_jax_train.log"
EXIT_STATUS = "~/polyglot_jax_train.exit"  # Written by the launched job when train returns.
# Node / queued-resource states after which the slice is gone or going and must be recreated.
LOST_STATES = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "SUSPENDING", "SUSPENDED",
               "FAILED", "DELETING", "NOT_FOUND"}
RUNNING_PATTERN = "[p]olyglot-jax train"  # Matches train, not the shell that runs pgrep/pkill.
RESTART_EXIT_CODES = {143}  # train's exit status after SIGTERM: a maintenance event, preemption.


def _location(args: argparse.Namespace) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _on_workers(args: argparse.Namespace, remote: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
          f"--worker={worker}", f"--command={remote}"]


def create(args: argparse.Namespace) -> list[list[str]]:
  """A queued resource (waits for capacity) or a TPU VM created at once; optionally spot."""
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
             f"--node-id={args.name}", *_location(args), f"--accelerator-type={args.accelerator}",
             f"--runtime-version={RUNTIME_VERSION}"] + (["--spot"] if args.spot else [])]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
           f"--accelerator-type={args.accelerator}", f"--version={RUNTIME_VERSION}"]
          + (["--spot"] if args.spot else [])]


def install(args: argparse.Namespace) -> list[list[str]]:
  """This checkout's HEAD on every worker, installed in a virtual environment."""
  remote = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
            f"python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]=={JAX_VERSION}'")
  return [["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:~/",
           *_location(args), "--worker=all"],
          _on_workers(args, remote)]


def launch(args: argparse.Namespace) -> list[list[str]]:
  """`polyglot-jax train` with the given flags on every worker, in the background."""
  if not args.train_args:
    raise ValueError("launch needs the train flags after `--`, e.g. -- "
                     "--gin_file=experiments/my_run.gin --gin_file=mesh/v4_32.gin")
  train = shlex.join([".venv/bin/polyglot-jax", "train", *args.train_args])
  job = shlex.quote(f"{train}; echo $? > {EXIT_STATUS}")
  remote = f"cd {REMOTE_DIR} && rm -f {EXIT_STATUS} && nohup sh -c {job} > {LOG} 2>&1 < /dev/null &"
  return [_on_workers(args, remote)]


def logs(args: argparse.Namespace) -> list[list[str]]:
  """Follows worker 0's log (every worker prints the same global losses)."""
  return [_on_workers(args, f"tail -n 100 -f {LOG}", worker=args.worker)]


def stop(args: argparse.Namespace) -> list[list[str]]:
  """SIGTERM to train on every worker: it saves a checkpoint after an agreed step and exits."""
  return [_on_workers(args, f"pkill -TERM -f {shlex.quote(RUNNING_PATTERN)} || true")]


def delete(args: argparse.Namespace) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name,
             *_location(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args),
           "--quiet"]]


def state(args: argparse.Namespace) -> list[str]:
  """Prints the slice's state (READY, PREEMPTED, ...; ACTIVE, SUSPENDED, ... when queued)."""
  if args.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
            *_location(args), "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_location(args),
          "--format=value(state)"]


def exit_status(args: argparse.Namespace) -> list[str]:
  """Prints the job's exit status on worker 0, `running` while train runs, else `absent`."""
  running = f"pgrep -f {shlex.quote(RUNNING_PATTERN)} > /dev/null"
  return _on_workers(args, f"cat {EXIT_STATUS} 2>/dev/null || ({running} && echo running "
                     "|| echo absent)", worker="0")


Runner = Callable[[list[str]], tuple[int, str]]  # A command -> (exit status, stdout).


def _run(command: list[str]) -> tuple[int, str]:
  print(shlex.join(command), flush=True)
  done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
  return done.returncode, done.stdout.strip()


def supervise(args: argparse.Namespace, run: Runner = _run,
              sleep: Callable[[float], None] = time.sleep) -> int:
  """Keeps the job running to its end through preemptions; returns train's exit status.

  Each round: (re)create the slice unless it is up, wait until it is READY/ACTIVE, install,
  launch, then poll the slice's state and the job's exit status every `--poll_seconds`. A lost
  slice, a SIGTERM exit or a failed gcloud command starts the next round (train resumes from
  its checkpoint); exit 0 or any other failure (a config error, NaN loss) ends supervision.
  """
  for round_ in range(args.max_restarts + 1):
    if round_:
      print(f"Restart {round_} of at most {args.max_restarts}.", flush=True)
      sleep(args.poll_seconds)
    try:
      if not _bring_up(args, run, sleep):
        continue
      if run(exit_status(args))[1] != "running":  # E.g. this supervisor itself was restarted.
        for command in install(args) + launch(args):
          _check(run, command)
      status = _watch(args, run, sleep)
    except RuntimeError as exc:
      print(f"{exc} Trying again.", file=sys.stderr, flush=True)
      continue
    if status is None:
      print("The slice was preempted.", flush=True)
    elif status in RESTART_EXIT_CODES:
      print(f"train exited with status {status} (SIGTERM).", flush=True)
    else:
      print(f"train exited with status {status}; see `tpu/pod.py logs`.", flush=True)
      return status
  print(f"Gave up after {args.max_restarts} restarts.", file=sys.stderr, flush=True)
  return 1


def _bring_up(args: argparse.Namespace, run: Runner, sleep: Callable[[float], None]) -> bool:
  """Creates the slice unless it is up and waits for it; False when it is lost meanwhile."""
  current = _state(args, run)
  if current in LOST_STATES:
    if current != "NOT_FOUND":
      _check(run, delete(args)[0])
    _check(run, create(args)[0])
  while (current := _state(args, run)) not in ("READY", "ACTIVE"):
    if current in LOST_STATES:
      return False
    sleep(args.poll_seconds)
  return True


def _watch(args: argparse.Namespace, run: Runner, sleep: Callable[[float], None]) -> int | None:
  """Polls until the job exits (its exit status) or the slice is lost (None)."""
  while True:
    sleep(args.poll_seconds)
    if _state(args, run) in LOST_STATES:
      return None
    code, status = run(exit_status(args))
    if code == 0 and status.isdigit():
      return int(status)


def _state(args: argparse.Namespace, run: Runner) -> str:
  code, out = run(state(args))
  return out.strip().upper() if code == 0 and out.strip() else "NOT_FOUND"


def _check(run: Runner, command: list[str]) -> None:
  code, _ = run(command)
  if code:
    raise RuntimeError(f"`{shlex.join(command)}` failed with exit status {code}.")


COMMANDS = {"create": create, "install": install, "launch": launch, "logs": logs,
            "stop": stop, "delete": delete}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=sorted(COMMANDS) + ["supervise"])
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b (where v4 lives).")
  parser.add_argument("--project", default=None, help="default: gcloud's configured project.")
  parser.add_argument("--accelerator", default="v4-8", help="create: v4-8, v4-32, ..., v4-512.")
  parser.add_argument("--queued", action="store_true",
                      help="create/delete: through a queued resource (waits for capacity).")
  parser.add_argument("--spot", action="store_true", help="create: spot (preemptible) capacity.")
  parser.add_argument("--worker", default="0", help="logs: which worker's log to follow.")
  parser.add_argument("--poll_seconds", type=float, default=60.0,
                      help="supervise: seconds between checks of the slice and the job.")
  parser.add_argument("--max_restarts", type=int, default=100,
                      help="supervise: how many times to recreate and relaunch at most.")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing.")
  parser.epilog = "launch, supervise: the flags for `polyglot-jax train` follow a `--`."
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = _parser().parse_args(argv[:split])
  args.train_args = argv[split + 1:]
  try:
    if args.command == "supervise":
      launch(args)  # Checks the train flags before anything is created.
      if not args.dry_run:
        return supervise(args)
      commands = [state(args), *create(args), *install(args), *launch(args), exit_status(args)]
    else:
      commands = COMMANDS[args.command](args)
  except ValueError as exc:
    print(f"tpu/pod.py {args.command}: error: {exc}", file=sys.stderr)
    return 2
  for command in commands:
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      code = subprocess.call(command)
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
