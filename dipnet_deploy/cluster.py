"""Ray for ``compare --ray`` and ``upscale --ray``: worker actors that each hold model sessions and take
one input at a time, while the driver shows the progress and writes every output.

Conventions:
- the driver joins the cluster named by ``RayOptions.address``, else by ``RAY_ADDRESS``, else starts
  a local Ray on this machine's cores (and stops it at the end); a Ray already initialised in this
  process is used as it is;
- each worker actor runs ``setup(*setup_args)`` once (building its runtime sessions; an InputError
  there fails the run with that line) and then ``task(state, item)`` per item; results arrive in
  completion order, with their item, and the caller puts them back in input order;
- workers read the inputs at the paths the driver lists (relative ones from the driver's working
  folder), so inputs must be on a filesystem every node mounts at the same path: an input a worker
  cannot see fails the run with one line naming it and the node;
- a task's only effect is its result (or a temporary file whose name the driver chose and renames
  when the result arrives), so the retry of a task whose worker died (``max_restarts``,
  ``max_task_retries``) neither duplicates nor loses an output;
- a task's InputError, or any other exception it raises, skips that item with its message: the
  run goes on, as local runs skip unreadable files;
- Ctrl-C, or any error, on the driver kills the actors before it propagates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dipnet_deploy.errors import InputError

RESTARTS = 3  # a worker process that dies is restarted, and its task retried, this many times
LOCAL_OBJECT_STORE_BYTES = 512 << 20  # a local Ray's object store: results are PNG bytes and metric rows


@dataclass
class RayOptions:
    address: str | None = None  # a cluster (``ray start --head`` prints it; "auto": the one on this machine)
    workers: int | None = None  # actors; None: the cluster's CPUs // cpus_per_worker (at most one per item)
    cpus_per_worker: int = 1  # CPUs Ray reserves for each actor, and its runtime's threads


@dataclass
class Outcome:
    """One item's result: ``value`` when it succeeded, else ``error`` (the item is skipped)."""

    item: object
    value: object = None
    error: InputError | None = None


class Worker:
    """What each actor runs (wrapped by ``ray.remote`` at run time, so importing this module needs no Ray)."""

    def __init__(self, setup: Callable, setup_args: tuple, cwd: str):
        self.node = socket.gethostname()
        with contextlib.suppress(OSError):  # relative paths mean what they mean on the driver (else: not visible)
            os.chdir(cwd)
        try:
            self.state, self.error = setup(*setup_args), None
        except InputError as error:
            self.state, self.error = None, error
        except Exception as error:  # a runtime's own exception types
            self.state = None
            self.error = InputError("--ray", f"a worker on {self.node} could not start ({type(error).__name__}: {error})")

    def run(self, task: Callable, item, paths: list[str]) -> tuple[str, Outcome]:
        """("fatal", outcome) when this worker cannot work or cannot see an input, else ("done", outcome)."""
        if self.error is not None:
            return "fatal", Outcome(item, error=self.error)
        for path in paths:
            if not os.path.exists(path):
                return "fatal", Outcome(item, error=InputError(path, (
                    f"the Ray worker on {self.node} cannot see this input; --ray needs the inputs on a filesystem "
                    "every node mounts at the same path")))
        try:
            return "done", Outcome(item, value=task(self.state, item))
        except InputError as error:
            return "done", Outcome(item, error=error)
        except Exception as error:  # a runtime's own failure on one input: skip it, as a local run would
            return "done", Outcome(item, error=InputError(paths[0] if paths else "input",
                                                          f"failed ({type(error).__name__}: {error})"))


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray", "needs Ray: pip install 'dipnet-deploy[ray]'") from None
    return ray


def connect(options: RayOptions) -> None:
    """Join or start Ray (see the module conventions), unless this process already has."""
    ray = import_ray()
    if ray.is_initialized():
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    where = "--ray-address" if options.address else "RAY_ADDRESS"
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    if address:
        refuse_unreachable(address, where)
    try:
        with silenced_stderr(), driver_signals_kept():
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,  # a new one, ours
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as error:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else "; a cluster with token authentication (the default of "
                "`ray start` since Ray 2.59) also needs RAY_AUTH_MODE=token here and its token")
        raise InputError(where, f"cannot join the Ray cluster at {address} ({error}{hint})".replace("\n", " ")) from None


@contextlib.contextmanager
def driver_signals_kept() -> Iterator[None]:
    """The driver's signal handlers put back after the block (``ray.init``): Ray replaces the SIGTERM handler with
    one that calls ``sys.exit(15)`` (no clean-up, exit 15), and its C++ core adds a crash reporter that prints a
    stack in several lines for SIGTERM. A SIGTERM that Ray's handler turned into SystemExit meanwhile goes to the
    driver's handler (``cli.run``'s: the clean-up of Ctrl-C). A handler set to ignore a signal meanwhile (the
    driver's, while it cleans up) stays."""
    if threading.current_thread() is not threading.main_thread():  # no handler can be set elsewhere
        yield
        return
    saved = {each: signal.getsignal(each) for each in signal.valid_signals()}
    kept = {each: handler for each, handler in saved.items() if callable(handler) or each == signal.SIGTERM}
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM or not callable(kept[signal.SIGTERM]):
            raise
        kept[signal.SIGTERM](signal.SIGTERM, None)
        raise
    finally:
        for each, handler in kept.items():
            if handler is not None and signal.getsignal(each) is not signal.SIG_IGN:
                signal.signal(each, handler)


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Standard error (the file descriptor: Ray's C++ core logs its connection retries there, several lines
    each, which the one-line refusal replaces) sent to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def refuse_unreachable(address: str, where: str, seconds: float = 10.0) -> None:
    """Refuse a host:port nothing answers on within ``seconds``: Ray itself would retry for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # "auto", "ray://...": Ray resolves those itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as error:
        raise InputError(where, f"nothing answers at {address} ({error.strerror or error}); start the head with "
                                "`ray start --head` and give the address it prints") from None


def cluster_description(options: RayOptions, workers: int) -> dict:
    """What ran the work, for summaries and reports."""
    ray = import_ray()
    return {"backend": "ray", "workers": workers, "cpus_per_worker": options.cpus_per_worker,
            "nodes": len([node for node in ray.nodes() if node.get("Alive")]),
            "address": options.address or os.environ.get("RAY_ADDRESS") or "local"}


def worker_count(options: RayOptions) -> int:
    """``options.workers`` (default: as many as fit), refused when the cluster cannot place that many:
    an actor Ray cannot place waits forever, and so would the run."""
    ray = import_ray()
    per_node = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    fit = sum(cpus // options.cpus_per_worker for cpus in per_node)
    if fit < 1:
        raise InputError("--ray-cpus-per-worker", f"{options.cpus_per_worker} CPUs per worker: no node of the cluster "
                                                  f"has that many (largest: {max(per_node, default=0)})")
    if options.workers is not None and options.workers > fit:
        raise InputError("--ray-workers", f"{options.workers} workers of {options.cpus_per_worker} CPU(s) do not fit "
                                          f"the cluster's nodes (room for {fit})")
    return options.workers or fit


@contextlib.contextmanager
def ray_map(setup: Callable, setup_args: tuple, task: Callable, items: list,
            paths_of: Callable[[object], list[Path]], options: RayOptions) -> Iterator[tuple[int, Iterator[Outcome]]]:
    """(the number of workers, the outcomes of ``task`` over ``items`` in completion order).

    ``paths_of(item)`` lists the files a worker must see for the item. Raises InputError when a
    worker cannot start or cannot see an input, or when Ray gives up on a worker.
    """
    ray = import_ray()
    from ray.util import ActorPool

    ours = not ray.is_initialized()  # then stop it at the end, even when Ctrl-C lands inside ray.init
    actors = []
    try:
        connect(options)
        count = min(len(items), worker_count(options))
        remote = ray.remote(num_cpus=options.cpus_per_worker, max_restarts=RESTARTS, max_task_retries=RESTARTS)(Worker)
        actors = [remote.remote(setup, setup_args, os.getcwd()) for _ in range(count)]
        pool = ActorPool(actors)

        def outcomes() -> Iterator[Outcome]:
            submit = lambda actor, item: actor.run.remote(task, item, [str(p) for p in paths_of(item)])  # noqa: E731
            try:
                for status, outcome in pool.map_unordered(submit, items):
                    if status == "fatal":
                        raise outcome.error
                    yield outcome
            except ray.exceptions.RayError as error:  # a worker Ray could not restart, or a lost node
                raise InputError("--ray", f"the cluster lost a worker ({type(error).__name__}: "
                                          f"{str(error).splitlines()[0] if str(error) else ''})") from None

        yield count, outcomes()
    finally:
        with silenced_stderr():  # Ray logs the retry of every task a stop interrupts: not the user's concern
            if ours and ray.is_initialized():
                ray.shutdown()  # ends this driver's job: its actors go with it, and Ray's log threads stop
            else:  # a Ray this process had before: leave it running, without our actors
                for actor in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
