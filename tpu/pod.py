"""Create, set up, run on, watch and delete a Cloud TPU VM slice with gcloud.

    python tpu/pod.py create  --name=run1 --zone=us-central2-b --accelerator=v4-128 --queued --spot
    python tpu/pod.py install --name=run1 --zone=us-central2-b
    python tpu/pod.py launch  --name=run1 --zone=us-central2-b -- \\
        --gin_file=experiments/my_run.gin --gin_file=mesh/v4_128.gin --gin.MODEL_DIR=/mnt/run
    python tpu/pod.py logs    --name=run1 --zone=us-central2-b
    python tpu/pod.py delete  --name=run1 --zone=us-central2-b --queued

Run it from the repository root. `--dry-run` prints the exact commands instead of running
them. `install` copies this checkout (`git archive HEAD`) to every worker and installs it with
the pinned dependencies and `jax[tpu]`; `launch` starts `polyglot-jax train` on all workers
at once (JAX finds the other hosts itself). After a spot slice is reclaimed, create, install
and launch it again with the same MODEL_DIR (on storage that outlives the slice): train
resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

RUNTIME_VERSION = "tpu-ubuntu2204-base"  # The TPU VM image for v4 slices.
JAX_VERSION = "0.10.2"  # pyproject.toml's pin; jax[tpu] brings the matching libtpu.
ARCHIVE = "polyglot_jax.tar.gz"
REMOTE_DIR = "~/polyglot_jax"
LOG = "~/polyglot_jax_train.log"


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
  remote = f"cd {REMOTE_DIR} && nohup {train} > {LOG} 2>&1 < /dev/null &"
  return [_on_workers(args, remote)]


def logs(args: argparse.Namespace) -> list[list[str]]:
  """Follows worker 0's log (every worker prints the same global losses)."""
  return [_on_workers(args, f"tail -n 100 -f {LOG}", worker=args.worker)]


def delete(args: argparse.Namespace) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name,
             *_location(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args),
           "--quiet"]]


COMMANDS = {"create": create, "install": install, "launch": launch, "logs": logs,
            "delete": delete}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=sorted(COMMANDS))
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b (where v4 lives).")
  parser.add_argument("--project", default=None, help="default: gcloud's configured project.")
  parser.add_argument("--accelerator", default="v4-8", help="create: v4-8, v4-32, ..., v4-512.")
  parser.add_argument("--queued", action="store_true",
                      help="create/delete: through a queued resource (waits for capacity).")
  parser.add_argument("--spot", action="store_true", help="create: spot (preemptible) capacity.")
  parser.add_argument("--worker", default="0", help="logs: which worker's log to follow.")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing.")
  parser.epilog = "launch: the flags for `polyglot-jax train` follow a `--`."
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = _parser().parse_args(argv[:split])
  args.train_args = argv[split + 1:]
  try:
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
