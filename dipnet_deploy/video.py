"""Video through PyAV: re-encode a clip frame by frame with an RGB function, keeping its timing and audio.

Conventions: frames reach the function as HxWx3 uint8 RGB (converted from the decoded pixel
format with the frame's own colour tags) and come back as uint8 RGB of any one size, which are
encoded as yuv420p with the same colour tags. The output keeps the input's container (chosen
by the target's suffix, so a temporary name can be written), its frame rate and every frame's
timestamp (the encoder works in the input stream's time base) and its display matrix (a rotated
clip stays rotated); audio streams are copied packet for packet, other streams (subtitles, data)
are dropped.

Size limits: a file is opened only by the FFmpeg demuxer its suffix names (``DEMUXERS``), and only
when its first bytes are that container's signature: FFmpeg's guess would also take a picture, which
its image demuxers decode whole to learn the size. Every decoder, those ``av.open`` runs to read the
stream parameters included, refuses frames over ``max_pixels()`` (FFmpeg's ``max_pixels``), and
every frame must have the size the stream header declared before decoding began.

Memory: a video is refused before any frame is decoded when what its frames take, estimated from the stream
header (``video_bytes``: the decoder's frames, the RGB frame, its upscaled copies and the frames the encoder
keeps in flight, which dominate), is over the memory budget (``memory_budget``): ``check_video_memory``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import is_write_failure
from dipnet_deploy.imageio import check_pixel_count, max_pixels
from dipnet_deploy.memory_budget import refuse_over_budget

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}  # muxers
DEMUXERS = {".mp4": "mov", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska", ".avi": "avi"}
CONTAINER_NAMES = {"mov": "MP4/QuickTime", "matroska": "Matroska/WebM", "avi": "AVI"}
ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")  # what an MP4/QuickTime file starts with
DEFAULT_CODEC = "libx264"  # H.264
WEBM_CODEC = "libvpx-vp9"  # WebM admits only VP8/VP9/AV1
COLOUR_TAGS = ("colorspace", "color_range", "color_primaries", "color_trc")
# Bytes per output pixel an encoder holds once its look-ahead is full (lookahead, B-frames and references, at
# the output size): libx264 some 190 with its default 40-frame rc-lookahead, under 50 with ours
# (``X264_OPTIONS``), libvpx-vp9 some 100, libx265 and libsvtav1 less than libx264's default on 2 cores. Any other
# encoder is counted as libx264 at its defaults.
X264_OPTIONS = {"rc-lookahead": "10"}  # a quarter of the default look-ahead: 1080p -> 4K fits the default budget
ENCODER_BYTES_PER_PIXEL = {DEFAULT_CODEC: 60, "libvpx-vp9": 110}
DEFAULT_ENCODER_BYTES_PER_PIXEL = 200
# Frames a decoder may hold: H.264's largest picture pool (16 references, reordering and the frame being made);
# the other decoders keep fewer.
DECODER_FRAMES = 36
WIDEST_SAMPLE_BYTES = 8  # a pixel format the header leaves open counts as 16-bit RGBA


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


def container_signature(head: bytes) -> str | None:
    """The demuxer of ``DEMUXERS`` whose container a file beginning with ``head`` (12 bytes) is, or None."""
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return "mov" if head[4:8] in ISO_BOXES else None


def decoder_options() -> dict[str, str]:
    """FFmpeg decoder options that bound every frame to the size limit before it is allocated."""
    return {"max_pixels": str(max_pixels())}


def open_video(path: Path) -> av.container.InputContainer:
    """``path`` (named with one of ``VIDEO_SUFFIXES``) opened by the demuxer of its suffix, if it has that
    container's signature (see the module's size limits); a decoder that ``av.open`` runs is bounded by
    ``decoder_options``."""
    demuxer = DEMUXERS[path.suffix.lower()]
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    if container_signature(head) != demuxer:
        raise InputError(path, f"not a readable video (its content is no {CONTAINER_NAMES[demuxer]} container, "
                               f"which {path.suffix} names)")
    return av.open(str(path), format=demuxer, options=decoder_options())


def frame_bytes(pix_fmt: str | None) -> float:
    """Bytes per pixel of a decoded frame in FFmpeg's pixel format ``pix_fmt`` (its planes, chroma subsampled)."""
    try:
        layout = av.VideoFormat(pix_fmt, 16, 16)
    except (TypeError, ValueError):  # no format in the header, or one this PyAV does not know
        return WIDEST_SAMPLE_BYTES
    return sum(-(-part.bits // 8) * part.width * part.height for part in layout.components) / 256


def video_bytes(width: int, height: int, pix_fmt: str | None, scale: int, codec: str) -> int:
    """Peak bytes upscaling the frames (``width`` x ``height``, ``pix_fmt``) of a video x``scale`` and encoding
    them with ``codec`` takes: the decoder's frames and one RGB frame at the input size; at the output size the
    upscaled RGB frame, its copy for the encoder and the yuv420p frame made of it, and what the encoder keeps in
    flight. The model's own memory (its session, a tile's buffers) does not grow with the frame and is not counted."""
    pixels, out = width * height, width * height * scale**2
    decoding = pixels * (DECODER_FRAMES * frame_bytes(pix_fmt) + 3)
    encoding = out * (3 + 3 + 1.5 + ENCODER_BYTES_PER_PIXEL.get(codec, DEFAULT_ENCODER_BYTES_PER_PIXEL))
    return math.ceil(decoding + encoding)


def check_video_memory(source: Path, scale: int, codec: str, video: av.video.stream.VideoStream | None = None) -> None:
    """Refuse ``source`` when the frames of its first video stream (``video``, or read from the file's header) are
    over the megapixel limit, or their ``video_bytes`` over the memory budget: before any frame is decoded for
    the work (what ``av.open`` decodes to read the stream's parameters is bounded by ``decoder_options``)."""
    if video is not None:
        width, height, pix_fmt = _frame_layout(video)
    else:
        try:
            with open_video(source) as reader:
                if not reader.streams.video:
                    return  # transcode says so
                width, height, pix_fmt = _frame_layout(reader.streams.video[0])
        except av.FFmpegError:
            return  # transcode names what is wrong with the file
    check_pixel_count(source, width, height)
    refuse_over_budget(source, f"{width}x{height} frames ({width * height / 1e6:,.1f} megapixels)",
                       video_bytes(width, height, pix_fmt, scale, codec),
                       f"upscale them x{scale} and encode them with {codec}")


def _frame_layout(video: av.video.stream.VideoStream) -> tuple[int, int, str | None]:
    """(width, height, pixel format) of the frames the stream header of ``video`` declares."""
    context = video.codec_context
    return video.width, video.height, context.pix_fmt if context is not None else None


def _first_frame_tags(source: Path, scale: int) -> tuple[dict, list[int] | None]:
    """The colour tags of the first frame, and its display matrix for a ``scale`` times larger frame (None
    without one): the encoder must carry both before the output's header is written, which the first
    copied audio packet may do before a video frame is decoded."""
    with open_video(source) as reader:
        reader.streams.video[0].codec_context.options = decoder_options()
        for packet in reader.demux(video=0):
            for frame in _decode(source, packet, 0):
                tags = {key: getattr(frame, key) for key in COLOUR_TAGS}
                matrix = frame.side_data.get("DISPLAYMATRIX")
                if matrix is None:
                    return tags, None
                values = np.frombuffer(bytes(matrix), np.int32, count=9).astype(np.int64)
                values[6:8] *= scale  # the translation, in pixels of the frame (16.16 fixed point)
                return tags, np.clip(values, -2**31, 2**31 - 1).tolist()
    raise InputError(source, "has no video frames")


def _decode(source: Path, packet: av.Packet, frames: int) -> list[av.VideoFrame]:
    """The frames ``packet`` completes, after ``frames`` others; a decoder's error (a damaged stream, or a frame
    over the size limit, which ``decoder_options`` makes one) in one line."""
    try:
        return packet.decode()
    except av.FFmpegError as error:
        raise InputError(source, f"decoding stopped after {frames} frames: the stream is damaged, or a frame is "
                                 f"over the {max_pixels() / 1e6:g}-megapixel limit ({error})") from None


def transcode(source: Path, target: Path, suffix: str, convert: Callable[[np.ndarray], np.ndarray],
              scale: int, codec: str, crf: int, tick: Callable[[], None] = lambda: None) -> int:
    """Write ``convert`` of every frame of ``source``'s first video stream to ``target``; the frame count.

    ``suffix`` picks the container; ``convert`` enlarges each side ``scale`` times. Raises
    InputError for a file PyAV cannot read, one without video frames, a frame over the size limit or
    of another size than the header's, or a failing encoder.
    """
    try:
        with open_video(source) as reader:
            if not reader.streams.video:
                raise InputError(source, "has no video stream")
            video = reader.streams.video[0]
            if video.codec_context is None:
                raise InputError(source, "its video is in a format this FFmpeg cannot decode")
            # PyAV reports the decoder's size once decoding began: the header's is kept here, and checked
            width, height = video.width, video.height
            check_video_memory(source, scale, codec, video)  # and the megapixel limit
            video.codec_context.options = decoder_options()
            tags, matrix = _first_frame_tags(source, scale)
            audio = list(reader.streams.audio)
            frames = 0
            with av.open(str(target), "w", format=CONTAINERS[suffix.lower()]) as writer:
                try:
                    encoder = writer.add_stream(codec, rate=video.average_rate or video.guessed_rate or 25)
                except ValueError:  # PyAV's "format does not support codec"
                    raise InputError(source, f"a {suffix} file cannot hold {codec} video; choose another --codec "
                                             f"(default for {suffix}: {default_codec(suffix)})") from None
                encoder.width, encoder.height = width * scale, height * scale
                encoder.pix_fmt = "yuv420p"
                encoder.codec_context.time_base = video.time_base
                encoder.options = {"crf": str(crf), **({"b:v": "0"} if codec == WEBM_CODEC else {}),
                                   **(X264_OPTIONS if codec == DEFAULT_CODEC else {}),
                                   # AVI keeps no presentation times: B-frames would come back out of order
                                   **({"bf": "0"} if CONTAINERS[suffix.lower()] == "avi" else {})}
                for key, value in tags.items():  # tag the output as the input is tagged
                    setattr(encoder.codec_context, key, value)
                encoder.set_display_matrix(matrix)
                try:
                    copies = {stream.index: writer.add_stream_from_template(stream) for stream in audio}
                except ValueError as error:  # PyAV's "format does not support codec", for audio copied as it is
                    raise InputError(source, f"its audio cannot be copied into a {suffix} file ({error})") from None
                for packet in reader.demux(video, *audio):
                    if packet.stream.type != "video":
                        if packet.dts is not None:
                            packet.stream = copies[packet.stream.index]
                            writer.mux(packet)
                        continue
                    for frame in _decode(source, packet, frames):
                        if (frame.width, frame.height) != (width, height):
                            raise InputError(source, f"frame {frames} is {frame.width}x{frame.height}, the stream "
                                                     f"header says {width}x{height}")
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
        with open_video(path) as container:
            if not container.streams.video:
                return 0
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            if stream.duration and stream.time_base and stream.average_rate:
                return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
    except (av.FFmpegError, InputError):  # transcode says what is wrong with the file
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
