"""Upscale images and videos with a fixed-shape SR ONNX model (the deployed model at work).

Conventions:
- every image and video frame goes through ``tiling.TiledRunner`` (the implementation
  ``compare`` uses): exact tiles with a halo, so a local (no-ESA) model gives its whole-image
  result; an image smaller than the model input is mirror-padded up to it (a band near its
  right/bottom edge then differs slightly, as documented in ``tiling.py``); output rounded to uint8;
- images are read as 8-bit RGB (``imageio.read_rgb8``: gray replicated, alpha dropped, 16-bit
  reduced, each with a warning) and written as PNG: ``a/b.jpg`` -> ``OUT/a/b.png``; the output is
  written band by band as the tiles come (``TiledRunner.bands`` into ``imageio.PngWriter``), never
  whole in memory; an image whose header says it would take more than ``DIPNET_MAX_MEMORY_MB``
  (``upscale_bytes``) is refused before it is decoded;
- videos (``VIDEO_SUFFIXES``) keep their name and container; every frame of the first video
  stream is upscaled and encoded (H.264 by default, VP9 for WebM) with the input's timestamps,
  frame rate and colour tags; audio streams are copied packet for packet; other streams
  (subtitles, data) are not carried over; a video whose frames, upscaled and in the encoder's
  look-ahead, would take more than ``DIPNET_MAX_MEMORY_MB`` (``video.video_bytes``) is refused before
  a frame is decoded;
- a folder input is listed recursively (linked folders not entered) and its tree mirrored
  directly under the output folder; a file input lands at the top of it;
- nothing is ever written into an input folder or over an input file (refused before any work),
  every output is written to a temporary name and renamed when complete, and an output that
  already exists is left alone (skipped with a warning) unless ``overwrite``;
- inputs that cannot be read are skipped with a warning naming them; when nothing at all could
  be upscaled the run fails (InputError).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from dipnet_deploy.cluster import RayOptions, import_ray
from dipnet_deploy.compare import inspect_model
from dipnet_deploy.errors import InputError, RunEndingError
from dipnet_deploy.fileio import atomic_path, refuse_unwritable, removing_empty_folders, temp_beside, write_bytes_atomic
from dipnet_deploy.imageio import (
    IMAGE_SUFFIXES,
    ImageHeader,
    PngWriter,
    check_memory,
    decode_bytes,
    max_memory_bytes,
    not_a_file,
    read_rgb8,
    unreadable_folder,
)
from dipnet_deploy.progress import Progress, no_progress, ticks
from dipnet_deploy.runtime import check_parallelism, check_runtime
from dipnet_deploy.safety import refuse_collisions, same_file
from dipnet_deploy.tiling import TiledRunner
from dipnet_deploy.video import (
    VIDEO_SUFFIXES,
    check_codec,
    check_video_memory,
    count_frames,
    decoder_options,
    default_codec,
    open_video,
    transcode,
)

AVI_ORDER_FRAMES = 64  # frames of an AVI checked for B-frame order: a stream with B-frames has them from its start


@dataclass
class UpscaleOptions:
    """Settings of ``upscale``: the runtime that runs the model (``runtime.RUNTIMES``), the video
    encoder's settings, whether existing outputs are replaced, and where the work runs."""

    runtime: str = "onnxruntime"
    threads: int | None = None  # CPU threads of one forward; None: all cores
    codec: str | None = None  # video encoder; None: video.default_codec (H.264; VP9 for .webm)
    crf: int = 18  # constant rate factor of the video encoder (lower: better and larger)
    overwrite: bool = False
    ray: RayOptions | None = None  # run on a Ray cluster (cluster.py) instead of this process


@dataclass
class Job:
    source: Path
    target: Path
    video: bool


@dataclass
class UpscaleResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    images: int = 0
    videos: int = 0
    frames: int = 0
    seconds: float = 0.0
    execution: dict = field(default_factory=lambda: {"backend": "local", "workers": 1})  # or a Ray cluster's

    def summary(self, output_dir: Path, runtime: str) -> dict:
        return {"output": str(output_dir), "files": len(self.written), "images": self.images, "videos": self.videos,
                "frames": self.frames, "skipped": len(self.skipped), "seconds": round(self.seconds, 3),
                "frames_per_s": round(self.frames / self.seconds, 3) if self.seconds else 0.0, "runtime": runtime,
                "execution": self.execution["backend"], "workers": self.execution["workers"]}


def _media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES


def _job(source: Path, target: Path) -> Job:
    video = source.suffix.lower() in VIDEO_SUFFIXES
    return Job(source, target if video else target.with_suffix(".png"), video)


def plan(inputs: list[Path], output_dir: Path, warn: Callable[[str], None] = print) -> list[Job]:
    """Jobs for the inputs, in order; refuses (before any work) outputs into or over an input."""
    if not inputs:
        raise InputError("INPUT", "no input given (image files, videos or folders)")
    output_dir = Path(output_dir)
    jobs: list[Job] = []
    folders = [Path(source) for source in inputs if Path(source).is_dir()]
    for source in map(Path, inputs):
        if source.is_dir():
            if same_file(output_dir, source) or output_dir.resolve().is_relative_to(source.resolve()):
                raise InputError(output_dir, f"is inside the input folder {source}; choose an output folder outside it")
            for folder, _, names in sorted(os.walk(source, onerror=lambda error: warn(unreadable_folder(error)))):
                for name in sorted(names):
                    path = Path(folder) / name
                    if _media(path) and path.is_file():
                        jobs.append(_job(path, output_dir / path.relative_to(source)))
                    elif _media(path):
                        warn(not_a_file(path))
        elif source.is_file():
            if not _media(source):
                warn(f"warning: skipped {source}: not an image ({', '.join(IMAGE_SUFFIXES)}) "
                     f"or a video ({', '.join(VIDEO_SUFFIXES)})")
                continue
            jobs.append(_job(source, output_dir / source.name))
        else:
            raise InputError(source, "not a regular file or folder" if source.exists() else "no such file or folder")
    for job in jobs:  # an input folder inside the output folder can still be in the way of the mirrored tree
        inside = next((folder for folder in folders if job.target.resolve().is_relative_to(folder.resolve())), None)
        if inside is not None:
            raise InputError(job.target, f"output of {job.source} would be written into the input folder {inside}")
    refuse_collisions([(f"output of {job.source}", job.target) for job in jobs],
                      [("input", job.source) for job in jobs])
    refuse_unwritable(output_dir, folder=True)
    return jobs


# --------------------------------------------------------------------------- frames


def upscale_rgb(runner: TiledRunner, rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> (rH)x(rW)x3 uint8 RGB through the tiled model, rounded."""
    return runner.run_rgb8(rgb)[0]


def upscale_bytes(header: ImageHeader, runner: TiledRunner, png_in_memory: bool = False) -> int:
    """Peak bytes reading and upscaling the image of ``header`` takes: decoding it (``decode_bytes``), then
    its pixels, one band of output rows and the encoder's rows; with ``png_in_memory`` also the encoded PNG
    (at most its raw size). The model's own memory (its session, a tile's float32 input and output) does
    not grow with the image and is not counted."""
    r = runner.scale
    row = 1 + 3 * header.width * r  # a PNG row: its filter byte and pixels
    band = runner.band_rows(header.height) * header.width * r * 3
    work = 3 * header.pixels + band + 2 * PngWriter.ROWS * row
    if png_in_memory:  # deflate never grows the data by more than a little
        work += header.height * r * row * 1001 // 1000 + (1 << 20)
    return max(decode_bytes(header), work)


def memory_check(runner: TiledRunner, png_in_memory: bool = False) -> Callable[[ImageHeader], None]:
    """``read_rgb8``'s check for upscaling with ``runner``: refuse an image over the memory budget."""
    return lambda header: check_memory(header, upscale_bytes(header, runner, png_in_memory),
                                       f"upscale it x{runner.scale}")


def write_upscaled_png(runner: TiledRunner, rgb: np.ndarray, handle) -> None:
    """The upscaled ``rgb`` (HxWx3 uint8) as a PNG into the binary file ``handle``, band by band."""
    writer = PngWriter(handle, rgb.shape[1] * runner.scale, rgb.shape[0] * runner.scale)
    for band in runner.bands(rgb):
        writer.write(band)
        del band  # one band in memory at a time
    writer.close()


def upscaled_png(runner: TiledRunner, source: Path) -> tuple[bytes, list[str]]:
    """The upscaled image ``source`` encoded as PNG, and the notes on its conversion to 8-bit RGB."""
    rgb, notes = read_rgb8(source, memory_check(runner, png_in_memory=True))
    buffer = io.BytesIO()
    write_upscaled_png(runner, rgb, buffer)
    del rgb
    return buffer.getvalue(), notes


def refuse_unordered_avi(source: Path) -> None:
    """Refuse an AVI whose first ``AVI_ORDER_FRAMES`` frames decode out of time order: AVI stores no presentation
    times, and a stream with B-frames (DivX/XviD's packed ones, or H.264's) decodes in display order carrying
    the times of its packets in stored order, which the encoder refuses midway (or a player would show
    shuffled). A damaged stream is left to ``transcode`` to name."""
    if source.suffix.lower() != ".avi":
        return
    last = None
    try:
        with open_video(source) as reader:
            if not reader.streams.video:
                return
            video = reader.streams.video[0]
            video.codec_context.options = decoder_options()
            for count, frame in enumerate(reader.decode(video)):
                if count >= AVI_ORDER_FRAMES:
                    return
                if frame.pts is not None and last is not None and frame.pts <= last:
                    raise InputError(source, f"an AVI with B-frames: frame {count} decodes with time {frame.pts}, "
                                             f"not after {last} (AVI keeps no presentation times), so its timing "
                                             "cannot be kept; convert it to MP4 or MKV first")
                last = frame.pts if frame.pts is not None else last
    except av.FFmpegError:
        return


def upscale_video_into(runner: TiledRunner, source: Path, target: Path, options: UpscaleOptions,
                       tick: Callable[[], None] = lambda: None) -> int:
    """Upscale every frame of ``source`` into the file ``target`` (``video.transcode``, the container chosen
    by ``source``'s suffix); the frame count. A video whose frames would take more than the memory budget
    (``video.check_video_memory``), then an AVI whose frames decode out of time order, is refused first."""
    suffix = source.suffix
    codec = options.codec or default_codec(suffix)
    check_video_memory(source, runner.scale, codec)  # before any frame is decoded, the AVI check's included
    refuse_unordered_avi(source)
    return transcode(source, target, suffix, lambda rgb: upscale_rgb(runner, rgb), runner.scale, codec, options.crf,
                     tick)


def upscale_job(runner: TiledRunner, job: Job, options: UpscaleOptions, tick: Callable[[], None],
                warn: Callable[[str], None]) -> int:
    """Upscale one input into its target here (atomically); the frame count."""
    if job.video:
        with atomic_path(job.target) as temp:
            return upscale_video_into(runner, job.source, temp, options, tick)
    rgb, notes = read_rgb8(job.source, memory_check(runner))  # refused before decoding when over the budget
    for note in notes:
        warn(f"note: {job.source}: {note}")
    with atomic_path(job.target) as temp, open(temp, "wb") as handle:
        write_upscaled_png(runner, rgb, handle)
    tick()
    return 1


def upscale(inputs: list[Path], model_path: Path, output_dir: Path, options: UpscaleOptions = UpscaleOptions(),
            progress: Progress = no_progress, warn: Callable[[str], None] = print) -> UpscaleResult:
    """Upscale ``inputs`` (images, videos, folders) into ``output_dir``; see the module conventions.

    ``progress`` counts images and video frames ("upscale", the total the video headers declare).
    """
    check_runtime(options.runtime)
    if options.codec is not None:
        check_codec(options.codec)
    if options.ray is not None:
        import_ray()  # before any work: refuse at once without the extra
    inspect_model(Path(model_path), "model")
    check_parallelism(options.threads, "--threads")
    max_memory_bytes()  # DIPNET_MAX_MEMORY_MB refused at once when it is no number of MiB
    jobs = plan(inputs, output_dir, warn)
    todo = []
    result = UpscaleResult()
    for job in jobs:
        if job.target.exists() and not options.overwrite:
            result.skipped.append(f"{job.target} exists")
            warn(f"warning: skipped {job.source}: {job.target} exists (--overwrite replaces it)")
        else:
            todo.append(job)
    if not todo:
        if not jobs:
            raise InputError("INPUT", "no images or videos found")
        return result
    declared = {job.source: count_frames(job.source) for job in todo if job.video}  # from the headers
    total = sum(declared.get(job.source, 1) for job in todo) or None  # None: unknown
    began = time.perf_counter()
    failures = []

    def done(job: Job, frames: int) -> None:
        if frames < declared.get(job.source, 0):  # a truncated or damaged stream: say so, keep what decoded
            warn(f"note: {job.source}: {frames} of the {declared[job.source]} frames its header declares could be "
                 "decoded")
        result.frames += frames
        result.videos += job.video
        result.images += not job.video
        result.written.append(job.target)

    def failed(error: InputError) -> None:
        if len(jobs) == 1 or isinstance(error, RunEndingError):  # the one input given, or no room/memory for any
            raise error
        failures.append(error)
        result.skipped.append(str(error))
        warn(f"warning: skipped {error}")

    with removing_empty_folders():  # the folders of outputs that were skipped or failed go again
        if options.ray is not None:
            result.execution = _upscale_on_ray(todo, model_path, options, lambda: ticks(progress, "upscale", total),
                                               warn, done, failed)
        else:
            runner = TiledRunner(str(model_path), options.threads, runtime=options.runtime)
            with ticks(progress, "upscale", total) as tick:
                for job in todo:
                    try:
                        done(job, upscale_job(runner, job, options, tick, warn))
                    except InputError as error:
                        failed(error)
    result.seconds = time.perf_counter() - began
    if not result.written and failures:
        raise InputError(failures[-1].where, f"nothing upscaled ({len(failures)} input(s) unusable; last: "
                                             f"{failures[-1].problem})")
    return result


# --------------------------------------------------------------------------- on a Ray cluster (cluster.py)


def _ray_runner(model_path: str, threads: int, runtime: str) -> TiledRunner:
    return TiledRunner(model_path, threads, runtime=runtime)


def _ray_task(runner: TiledRunner, item: tuple[Job, Path | None, UpscaleOptions]) -> tuple[bytes | None, list[str], int]:
    """A worker's share: an image's PNG bytes (the driver writes them), or a video written to the temporary
    file the driver named (the driver renames it); (PNG or None, notes, frames)."""
    job, temp, options = item
    if job.video:
        return None, [], upscale_video_into(runner, job.source, temp, options)
    data, notes = upscaled_png(runner, job.source)
    return data, notes, 1


def _upscale_on_ray(todo: list[Job], model_path: Path, options: UpscaleOptions,
                    start: Callable[[], contextlib.AbstractContextManager[Callable[[], None]]],
                    warn: Callable[[str], None], done: Callable[[Job, int], None],
                    failed: Callable[[InputError], None]) -> dict:
    """Upscale ``todo`` on Ray workers; the driver writes images and renames finished videos into place.
    ``start()`` begins the progress once the workers are placed; returns ``cluster_description``.

    Each video gets a temporary file beside its target, made here (``fileio.temp_beside``) before the
    work, so a retried task rewrites the same file; whatever is left of them when the run stops is removed.
    """
    from dipnet_deploy.cluster import cluster_description, ray_map

    temps: dict[Path, Path] = {}
    try:
        for job in todo:
            if job.video:
                temps[job.target] = temp_beside(job.target)
        items = [(job, temps.get(job.target), options) for job in todo]
        with ray_map(_ray_runner, (str(model_path), options.ray.cpus_per_worker, options.runtime), _ray_task, items,
                     lambda item: [item[0].source], options.ray) as (count, outcomes):
            execution = cluster_description(options.ray, count)
            with start() as tick:
                for outcome in outcomes:
                    job = outcome.item[0]
                    if outcome.error is not None:
                        failed(outcome.error)
                        continue
                    data, notes, frames = outcome.value
                    for note in notes:
                        warn(f"note: {job.source}: {note}")
                    if job.video:
                        os.replace(temps[job.target], job.target)
                    else:
                        write_bytes_atomic(job.target, data)
                    for _ in range(frames):
                        tick()
                    done(job, frames)
        return execution
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
