"""Video through PyAV: re-encode a clip frame by frame with an RGB function, keeping its timing and audio.

Conventions: frames reach the function as HxWx3 uint8 RGB (converted from the decoded pixel
format with the frame's own colour tags) and come back as uint8 RGB of any one size, which are
encoded as yuv420p with the same colour tags. The output keeps the input's container (chosen
by the target's suffix, so a temporary name can be written), its frame rate and every frame's
timestamp (the encoder works in the input stream's time base); audio streams are copied packet
for packet, other streams (subtitles, data) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import is_write_failure
from dipnet_deploy.imageio import check_pixel_count

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}
DEFAULT_CODEC = "libx264"  # H.264
WEBM_CODEC = "libvpx-vp9"  # WebM admits only VP8/VP9/AV1
COLOUR_TAGS = ("colorspace", "color_range", "color_primaries", "color_trc")


def check_codec(name: str) -> None:
    """Refuse, before any work, a ``--codec`` that is not a video encoder of this PyAV's FFmpeg."""
    try:
        codec = av.codec.Codec(name, "w")
    except ValueError:  # av's UnknownCodecError
        raise InputError("--codec", f"{name!r} is not an encoder this FFmpeg has (e.g. libx264, libx265, "
                                    "libvpx-vp9, libsvtav1)") from None
    if codec.type != "video":
        raise InputError("--codec", f"{name} encodes {codec.type}, not video")


def default_codec(suffix: str) -> str:
    return WEBM_CODEC if suffix.lower() == ".webm" else DEFAULT_CODEC


def transcode(source: Path, target: Path, suffix: str, convert: Callable[[np.ndarray], np.ndarray],
              scale: int, codec: str, crf: int, tick: Callable[[], None] = lambda: None) -> int:
    """Write ``convert`` of every frame of ``source``'s first video stream to ``target``; the frame count.

    ``suffix`` picks the container; ``convert`` enlarges each side ``scale`` times. Raises
    InputError for a file PyAV cannot read, one without video frames, or a failing encoder.
    """
    try:
        with av.open(str(source)) as reader:
            if not reader.streams.video:
                raise InputError(source, "has no video stream")
            video = reader.streams.video[0]
            check_pixel_count(source, video.width, video.height)  # from the header, before any frame is decoded
            audio = list(reader.streams.audio)
            frames = 0
            with av.open(str(target), "w", format=CONTAINERS[suffix.lower()]) as writer:
                try:
                    encoder = writer.add_stream(codec, rate=video.average_rate or video.guessed_rate or 25)
                except ValueError:  # PyAV's "format does not support codec"
                    raise InputError(source, f"a {suffix} file cannot hold {codec} video; choose another --codec "
                                             f"(default for {suffix}: {default_codec(suffix)})") from None
                encoder.width, encoder.height = video.width * scale, video.height * scale
                encoder.pix_fmt = "yuv420p"
                encoder.codec_context.time_base = video.time_base
                encoder.options = {"crf": str(crf), **({"b:v": "0"} if codec == WEBM_CODEC else {})}
                copies = {stream.index: writer.add_stream_from_template(stream) for stream in audio}
                for packet in reader.demux(video, *audio):
                    if packet.stream.type != "video":
                        if packet.dts is not None:
                            packet.stream = copies[packet.stream.index]
                            writer.mux(packet)
                        continue
                    for frame in packet.decode():
                        if (frame.width, frame.height) != (video.width, video.height):  # the header said otherwise
                            raise InputError(source, f"frame {frames} is {frame.width}x{frame.height}, the stream "
                                                     f"header says {video.width}x{video.height}")
                        if not frames:  # tag the output as the input is tagged
                            for key in COLOUR_TAGS:
                                setattr(encoder.codec_context, key, getattr(frame, key))
                        out = av.VideoFrame.from_ndarray(convert(frame.to_ndarray(format="rgb24")), format="rgb24")
                        out = out.reformat(format="yuv420p", dst_colorspace=frame.colorspace,
                                           dst_color_range=frame.color_range)
                        out.pts, out.time_base = frame.pts, frame.time_base
                        writer.mux(encoder.encode(out))
                        frames += 1
                        tick()
                if not frames:
                    raise InputError(source, "has no video frames")
                writer.mux(encoder.encode(None))
    except av.FFmpegError as error:
        if is_write_failure(error):  # no room for the output: atomic_path names it, and the run ends
            raise
        raise InputError(source, f"not a readable video, or cannot be encoded with {codec} ({error})") from None
    return frames


def count_frames(path: Path) -> int:
    """The video's frame count from its header (estimated from the duration if absent; 0 if unknown)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return 0
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            if stream.duration and stream.time_base and stream.average_rate:
                return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
    except av.FFmpegError:
        pass
    return 0


def write_clip(path: Path, frames: list[np.ndarray], fps: Fraction, audio_rate: int | None = None, crf: int = 18) -> None:
    """Encode RGB ``frames`` as H.264 (the container from ``path``'s suffix), with an AAC 440 Hz tone
    as long as the video when ``audio_rate`` is given: test and benchmark material."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(DEFAULT_CODEC, rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt, video.options = "yuv420p", {"crf": str(crf)}
        sound = container.add_stream("aac", rate=audio_rate) if audio_rate else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            n = int(audio_rate * len(frames) / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / audio_rate)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = audio_rate, start
                container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
