"""One forward of a fixed-shape ONNX model, through onnxruntime or OpenVINO.

Conventions: a session takes the model's one input as a float32 [1, 3, H, W] array and returns its
first output as a float32 array the caller owns, or, given ``out`` (a C-contiguous float32 array of
the output's shape), writes it there: the runtime then writes into memory that is already mapped,
with no copy of the output (what a loop over frames wants: ``bench`` times both runtimes this way).
``threads`` is the number of CPU threads one forward may use (None: the runtime's default, all
cores). OpenVINO is an optional extra (``pip install 'dipnet-deploy[openvino]'``); it reads the same
ONNX file (QDQ int8 included) with its own API on the CPU, at fp32 inference precision (OpenVINO
would otherwise run float parts in bf16 on CPUs that have it, which is not the model that was
measured).

A forward runs in a helper thread while the calling (main) thread waits for it (``interruptible``): Python
runs a signal handler only between bytecodes of the main thread, so Ctrl-C or SIGTERM would otherwise wait
for a forward of seconds or minutes to end. On a signal the forward is told to stop (onnxruntime's
``RunOptions.terminate``, OpenVINO's ``cancel``) and waited for. A runtime that cannot allocate what a
forward or a session needs is one ``OutOfMemoryError`` naming the model; any other error goes on as it is.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from dipnet_deploy.errors import InputError, OutOfMemoryError
from dipnet_deploy.progress import Progress, no_progress

RUNTIMES = ("onnxruntime", "openvino")
MAX_THREADS_PER_CORE = 4  # more threads (or parallel sessions) than this per core only measure contention
SESSION_BYTES_PER_INPUT_PIXEL = 1024  # rough peak of one DIPNet-sized forward: ~64 live float channels x 4 tensors
FULL_HD_PIXELS = 1920 * 1080  # latencies are reported per 1080p-equivalent frame: seconds x FULL_HD_PIXELS / (H x W)
OPENVINO_INSTALL = "OpenVINO is not installed: pip install 'dipnet-deploy[openvino]' (or: pip install openvino)"
ORT_EXACT_INTEGER_KEY = "session.x64quantprecision"  # see ort_options
# Two uint8 x int8 products summed in an int16 cannot overflow when |weight| <= 64: 255 x 128 = 32640 < 2**15
SATURATION_FREE_WEIGHT = 64
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # /proc/cpuinfo: int8 dot products summed in int32
ORT_LOG_FATAL_ONLY = 4  # onnxruntime logs a failed forward itself, in colour and several lines: we say it in one
# what a runtime's failure to allocate says (onnxruntime's arena, C++'s std::bad_alloc as the runtimes word it,
# PyTorch's CPU allocator), with the bytes asked for where it gives them
ALLOCATION_FAILURE = re.compile(r"Failed to allocate memory(?:[^\n]*?of size (\d+))?|bad.alloc|bad allocation"
                                r"|DefaultCPUAllocator: (?:can't allocate memory|not enough memory)"
                                r"(?:[^\n]*?allocate (\d+) bytes)?")
UNNAMED_MODEL = "the model"  # how a stage that was not told the model's file names it (``model_named`` renames it)
WAIT_SLICE_S = 0.1  # the waiting thread looks for a signal this often, should the kernel hand it to another thread
T = TypeVar("T")


def check_parallelism(count: int | None, option: str, input_shape: list[int] | None = None,
                      sessions_each: int = 1) -> None:
    """Refuse, before anything is allocated, ``count`` threads (or parallel sessions) beyond
    ``MAX_THREADS_PER_CORE`` per core and, given the model's ``input_shape``, ``count`` x
    ``sessions_each`` sessions whose rough memory exceeds this machine's."""
    if count is None:
        return
    cores = os.cpu_count() or 1
    if count > MAX_THREADS_PER_CORE * cores:
        raise InputError(option, f"{count} on {cores} cores: at most {MAX_THREADS_PER_CORE * cores} "
                                 f"({MAX_THREADS_PER_CORE} per core)")
    if input_shape is not None:
        need = count * sessions_each * SESSION_BYTES_PER_INPUT_PIXEL * input_shape[2] * input_shape[3]
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > have:
            raise InputError(option, f"{count * sessions_each} sessions of a {input_shape[2]}x{input_shape[3]} model "
                                     f"need about {need / 2**30:,.0f} GiB, more than this machine's {have / 2**30:,.0f} GiB")


@contextlib.contextmanager
def allocation_failures_named(model: str | Path, runtime: str) -> Iterator[None]:
    """Turn a runtime's failure to allocate memory inside the block (``MemoryError``, or an error of the
    runtime's own type whose message is ``ALLOCATION_FAILURE``) into one ``OutOfMemoryError`` naming ``model``;
    any other error goes on as it is (a wrong input or a bug of ours keeps its traceback)."""
    try:
        yield
    except MemoryError:
        raise OutOfMemoryError(model, f"{runtime} ran out of memory for this model") from None
    except Exception as error:
        found = ALLOCATION_FAILURE.search(str(error))
        if found is None:
            raise
        asked = found.group(1) or found.group(2)
        size = f" (could not allocate {int(asked) / 2**20:,.0f} MiB)" if asked else ""
        raise OutOfMemoryError(model, f"{runtime} ran out of memory for this model{size}") from None


@contextlib.contextmanager
def model_named(model: str | Path) -> Iterator[None]:
    """Name ``model`` (its file) in an ``OutOfMemoryError`` raised inside the block by a stage that was given the
    model, not its file (it says ``UNNAMED_MODEL``); any other error goes on as it is."""
    try:
        yield
    except OutOfMemoryError as error:
        if error.where != UNNAMED_MODEL:
            raise
        raise OutOfMemoryError(model, error.problem) from None


def interruptible(forward: Callable[[], T], stop: Callable[[], None]) -> T:
    """``forward()``, run in a helper thread while this thread waits, so that a signal handler (Ctrl-C,
    SIGTERM) runs here at once; whatever it raises (or any exception in the wait) first calls ``stop()`` (it
    asks the forward to end) and waits for the forward. Off the main thread, where no handler runs,
    ``forward()`` runs directly. The runtimes release the GIL during a forward, so the wait costs it nothing."""
    if threading.current_thread() is not threading.main_thread():
        return forward()
    outcome: dict = {}
    # an Event, not Thread.join: a join that a signal handler's exception interrupts marks the thread as
    # ended while it still runs (Python 3.11, bpo-45274)
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = forward()
        except BaseException as error:  # handed to the waiting thread, which raises it
            outcome["error"] = error
        finally:
            done.set()

    # not a daemon: a forward still inside the runtime when Python finalizes aborts the process (its thread
    # takes the GIL back through a C++ frame), and Python's exit waits for the threads that are not daemons.
    # That covers a signal that comes while start() waits for the new thread, before it is known to run.
    helper = threading.Thread(target=target, name="dipnet-forward")
    try:
        helper.start()
        while not done.wait(WAIT_SLICE_S):
            pass
    except BaseException:
        stop()
        while helper.ident is not None and not done.is_set():
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: the stop takes one operation
                done.wait()
        raise
    helper.join()
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]


def ort_options():
    """The onnxruntime ``SessionOptions`` every session of this tool starts from: integer convolutions exact on
    every x86-64 CPU.

    Without VNNI (AVX2, AVX-512 without VNNI: many AMD EPYC and older Xeon), MLAS multiplies uint8 activations
    by int8 weights with ``vpmaddubsw``, which adds each pair of products into a saturating int16: a pixel
    near 255 against weights near +-127 overflows, and the int8 model's output is wrong (``BENCHMARKS.md``).
    ``session.x64quantprecision`` makes MLAS take its exact uint8 x uint8 path there (slower); CPUs with VNNI
    are unaffected. A user running the int8 model in onnxruntime elsewhere sets the same entry (README).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(ORT_EXACT_INTEGER_KEY, "1")
    return options


class OrtSession:
    """onnxruntime CPU session (default graph optimizations, sequential execution, ``ort_options``)."""

    def __init__(self, model: str | Path, threads: int | None):
        import onnxruntime as ort

        self.model = model
        options = ort_options()
        options.log_severity_level = ORT_LOG_FATAL_ONLY
        if threads:
            options.intra_op_num_threads = threads
        with allocation_failures_named(model, "onnxruntime"):
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_shape = tuple(self.session.get_outputs()[0].shape)
        self.binding = self.session.io_binding()

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        import onnxruntime as ort

        options = ort.RunOptions()  # one per forward: once told to terminate, it stays so
        options.log_severity_level = ORT_LOG_FATAL_ONLY
        if out is None:
            return self._forward(lambda: self.session.run(None, {self.input_name: x}, options)[0], options)
        check_output_buffer(out, self.output_shape)
        self.binding.bind_cpu_input(self.input_name, x)
        self.binding.bind_output(self.output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        try:
            self._forward(lambda: self.session.run_with_iobinding(self.binding, options), options)
        finally:
            self.binding.clear_binding_outputs()  # hold no pointer to the caller's buffer between calls
        return out

    def _forward(self, forward: Callable[[], T], options) -> T:
        with allocation_failures_named(self.model, "onnxruntime"):
            return interruptible(forward, lambda: setattr(options, "terminate", True))


class OpenVinoSession:
    """OpenVINO CPU compiled model with one infer request (latency hint, fp32 precision)."""

    def __init__(self, model: str | Path, threads: int | None):
        ov = import_openvino()
        self.model = model
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        with allocation_failures_named(model, "OpenVINO"):
            graph = core.read_model(str(model))
            refuse_saturating_int8(model, graph)
            self.request = core.compile_model(graph, "CPU", config).create_infer_request()
        self.own_output = self.request.get_output_tensor(0)
        self.output_shape = tuple(self.own_output.shape)
        self.bound: np.ndarray | None = None  # the caller's ``out`` the request writes into

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            check_output_buffer(out, self.output_shape)
        self._bind(out)
        with allocation_failures_named(self.model, "OpenVINO"):
            interruptible(lambda: self.request.infer({0: x}), self.request.cancel)
        return self.request.get_output_tensor(0).data.copy() if out is None else out

    def _bind(self, out: np.ndarray | None) -> None:
        """Point the request's output at ``out`` (shared memory) or back at its own buffer."""
        if out is self.bound:
            return
        tensor = self.own_output if out is None else import_openvino().Tensor(out, shared_memory=True)
        self.request.set_output_tensor(0, tensor)
        self.bound = out


def refuse_saturating_int8(model: str | Path, graph) -> None:
    """Refuse to run ``model`` (read by OpenVINO as ``graph``) where OpenVINO would compute it wrong: an int8
    model whose weights reach past ``SATURATION_FREE_WEIGHT`` on a CPU that sums int8 products in int16
    (``int8_sums_saturate``). OpenVINO has no exact mode for it there (onnxruntime has: ``ort_options``)."""
    if not int8_sums_saturate():
        return
    ov = import_openvino()
    widest = max((int(np.abs(op.get_data().astype(np.int16)).max()) for op in graph.get_ops()
                  if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8), default=0)
    if widest > SATURATION_FREE_WEIGHT:
        raise InputError(model, f"OpenVINO would compute this int8 model wrong on this CPU ({cpu_name()}): it has "
                                f"no VNNI, so int8 convolutions add pairs of uint8 x int8 products in saturating 16-bit "
                                f"sums, and these weights reach {widest} (at most {SATURATION_FREE_WEIGHT} is safe); run "
                                f"it with --runtime onnxruntime (exact on every CPU) or on a CPU with VNNI")


def int8_sums_saturate() -> bool:
    """True on an x86-64 CPU without VNNI (none of ``VNNI_FLAGS`` in /proc/cpuinfo): int8 convolutions there
    multiply uint8 by int8 with ``vpmaddubsw``, which adds each pair of products into a saturating int16."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpuinfo("flags")
    return flags is not None and not VNNI_FLAGS & set(flags.split())


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for the figures measured on it."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (its first CPU's), or None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)


def check_output_buffer(out: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse an ``out`` the runtime cannot write the output into as it is (it writes raw memory)."""
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}, "
                         f"not {out.dtype} {out.shape}")


def reusing_output(session) -> Callable[[np.ndarray], np.ndarray]:
    """``session``'s forward writing every result into one buffer allocated here (each call overwrites
    the last result): how a loop over frames runs, and how ``bench`` times every runtime alike."""
    buffer = np.empty(session.output_shape, np.float32)
    return lambda x: session.run(x, buffer)


def import_openvino():
    """The ``openvino`` module, or InputError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise InputError("--runtime openvino", OPENVINO_INSTALL) from None
    return openvino


def check_runtime(runtime: str) -> None:
    """Refuse an unknown runtime, or OpenVINO when it is not installed, before any work."""
    if runtime not in RUNTIMES:
        raise InputError("--runtime", f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    if runtime == "openvino":
        import_openvino()


def open_session(model: str | Path, runtime: str = "onnxruntime", threads: int | None = None):
    """A session of ``runtime`` on the ONNX file ``model``."""
    check_runtime(runtime)
    return OrtSession(model, threads) if runtime == "onnxruntime" else OpenVinoSession(model, threads)


def time_interleaved(forwards: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray,
                     repeats: int, progress: Progress = no_progress) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each forward on ``x``, after one warm-up call each.

    The calls are interleaved (one of each per round, in dict order), so drifts in the machine's
    load hit every forward alike and ratios of medians stay fair on a shared host.
    """
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for forward in forwards.values():
        forward(x)
    for _ in progress(range(repeats), "latency (interleaved rounds)", repeats):
        for name, forward in forwards.items():
            began = time.perf_counter()
            forward(x)
            times[name].append(time.perf_counter() - began)
    return times
