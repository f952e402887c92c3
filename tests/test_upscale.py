"""upscale: tiles vs a whole-image PyTorch run, folder mirroring, video with audio, bad input, runtimes."""

import json
import sys
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from dipnet_deploy.artifacts import PACKAGED_WEIGHTS
from dipnet_deploy.checkpoint import load_checkpoint
from dipnet_deploy.config import PRESETS
from dipnet_deploy.export import ExportOptions, export
from dipnet_deploy.sr_protocol import run_torch_whole
from dipnet_deploy.video import write_clip

from .conftest import random_train_model

FPS = Fraction(24, 1)


@pytest.fixture(scope="module")
def x2_model(tmp_path_factory):
    """A random-weight x2 model exported at 40x56 (tiles with a 16 px halo) and its unfolded module."""
    work = tmp_path_factory.mktemp("model")
    train_model = random_train_model(PRESETS["x2"].replace(expansion=8), std=0.06)
    torch.save(train_model.state_dict(), work / "x2.pth")
    onnx_path = export(load_checkpoint(work / "x2.pth"), work / "x2.onnx", ExportOptions(height=40, width=56)).onnx_path
    return onnx_path, train_model


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory):
    """The packaged x2 weights exported at 40x56: natural-looking outputs that survive video coding."""
    path = tmp_path_factory.mktemp("packaged") / "x2.onnx"
    return export(load_checkpoint(PACKAGED_WEIGHTS), path, ExportOptions(height=40, width=56)).onnx_path


def smooth_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((h, w, channels)) * 255).astype(np.uint8), (5, 5), 1.5)


def make_video(path, frames: int = 5, size: tuple[int, int] = (48, 64), audio: bool = True) -> None:
    """An H.264 video of smooth random frames at FPS (with an AAC tone when ``audio``)."""
    write_clip(path, [smooth_image(*size, seed) for seed in range(frames)], FPS, 16000 if audio else None, crf=10)


def decoded(path):
    """(frames as RGB, their times in seconds, the video stream's rate and size, audio packets' bytes)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate, size = stream.average_rate, (stream.width, stream.height)
        audio = [(s.codec_context.name, s.rate) for s in container.streams.audio]
        frames, times = [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
    with av.open(str(path)) as container:
        packets = [bytes(p) for p in container.demux(audio=0) if p.size] if audio else []
    return frames, times, rate, size, audio, packets


def test_tiled_upscale_equals_whole_image_pytorch(x2_model, tmp_path, invoke):
    onnx_path, train_model = x2_model
    lr = smooth_image(70, 100, 7)  # larger than one 40x56 tile: 3x3 tiles with halos
    cv2.imwrite(str(tmp_path / "lr.png"), cv2.cvtColor(lr, cv2.COLOR_RGB2BGR))
    code, out, err = invoke("upscale", tmp_path / "lr.png", "--model", onnx_path, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    result = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "lr.png")), cv2.COLOR_BGR2RGB)
    whole = run_torch_whole(train_model, lr)  # unfolded module, whole image at once
    assert result.shape == (140, 200, 3)
    assert np.abs(result.astype(int) - whole.astype(int)).max() <= 1
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["files"] == 1 and summary["images"] == 1 and summary["frames"] == 1
    from dipnet_deploy.tiling import TiledRunner
    from dipnet_deploy.upscale import upscale_rgb

    exact = smooth_image(40, 56, 8)  # exactly the model input: one forward, no tiles
    assert np.abs(upscale_rgb(TiledRunner(str(onnx_path)), exact).astype(int)
                  - run_torch_whole(train_model, exact).astype(int)).max() <= 1


def test_folder_tree_mirrored_conversions_and_unreadable_skipped(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    src = tmp_path / "photos"
    (src / "trip" / "day1").mkdir(parents=True)
    cv2.imwrite(str(src / "a.jpg"), smooth_image(44, 60, 1))
    cv2.imwrite(str(src / "trip" / "day1" / "b.png"), smooth_image(50, 58, 2, channels=4))  # RGBA
    cv2.imwrite(str(src / "trip" / "g.tif"), (smooth_image(42, 57, 3)[..., 0].astype(np.uint16) * 257))  # 16-bit gray
    (src / "trip" / "broken.png").write_bytes(b"not a png")
    (src / "notes.txt").write_text("not media")
    code, out, err = invoke("upscale", src, "--model", onnx_path, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["a.png", "trip/day1/b.png", "trip/g.png"]
    assert "broken.png" in err and "alpha channel dropped" in err and "16-bit" in err
    assert cv2.imread(str(tmp_path / "out" / "trip" / "day1" / "b.png"), cv2.IMREAD_UNCHANGED).shape == (100, 116, 3)
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["files"], summary["images"], summary["skipped"]) == (3, 3, 1)
    # a second run leaves existing outputs alone unless --overwrite
    before = (tmp_path / "out" / "a.png").stat().st_mtime_ns
    code, out, err = invoke("upscale", src / "a.jpg", "--model", onnx_path, "-o", tmp_path / "out")
    assert code == 0 and "exists" in err and (tmp_path / "out" / "a.png").stat().st_mtime_ns == before


def test_video_with_audio_in_and_out(packaged_model, tmp_path, invoke):
    onnx_path = packaged_model
    source = tmp_path / "clip.mp4"
    make_video(source)
    code, out, err = invoke("upscale", source, "--model", onnx_path, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    frames_in, times_in, rate_in, size_in, audio_in, packets_in = decoded(source)
    frames_out, times_out, rate_out, size_out, audio_out, packets_out = decoded(tmp_path / "out" / "clip.mp4")
    assert len(frames_out) == len(frames_in) == 5
    assert size_out == (2 * size_in[0], 2 * size_in[1])
    assert rate_out == rate_in == FPS and times_out == times_in
    assert audio_out == audio_in == [("aac", 16000)] and packets_out == packets_in  # copied, not re-encoded
    # each output frame is the upscale of its own input frame, in order (H.264 loses detail both ways)
    from dipnet_deploy.tiling import TiledRunner
    from dipnet_deploy.upscale import upscale_rgb

    runner = TiledRunner(str(onnx_path))
    expected = [upscale_rgb(runner, frame).astype(float) for frame in frames_in]
    for i, got in enumerate(frames_out):
        distances = [np.abs(got - reference).mean() for reference in expected]
        assert distances[i] < 5 and distances[i] < 0.5 * min(np.delete(distances, i))
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["videos"], summary["frames"]) == (1, 5)


def test_video_codec_option(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    make_video(tmp_path / "clip.mkv", frames=2, audio=False)
    code, _, err = invoke("upscale", tmp_path / "clip.mkv", "--model", onnx_path, "-o", tmp_path / "out",
                          "--codec", "libvpx-vp9", "--crf", "30")  # (libx265 fails now and then on frames this small)
    assert code == 0, err
    with av.open(str(tmp_path / "out" / "clip.mkv")) as container:
        assert container.streams.video[0].codec_context.name == "vp9"


def _one_error_line(err: str) -> str:
    """The refusal, when it is all stderr holds (progress bars aside)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("upscale:")]
    assert len(lines) == 1 and lines[0].startswith("dipnet-deploy: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("codec, words", [("nonsense", "not an encoder"), ("aac", "encodes audio, not video")])
def test_codec_checked_before_any_work(codec, words, x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    make_video(tmp_path / "clip.mp4", frames=2, audio=False)
    code, _, err = invoke("upscale", tmp_path / "clip.mp4", "--model", onnx_path, "-o", tmp_path / "out", "--codec", codec)
    line = _one_error_line(err)
    assert code == 2 and "--codec" in line and words in line and not (tmp_path / "out").exists()


def test_bad_videos_fail_cleanly(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 100)
    code, out, err = invoke("upscale", tmp_path / "garbage.mp4", "--model", onnx_path, "-o", tmp_path / "out")
    assert code == 2 and "garbage.mp4" in _one_error_line(err) and not (tmp_path / "out").exists()
    with av.open(str(tmp_path / "empty.mkv"), "w") as container:  # a video stream with no frames (and audio)
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=16000)
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    code, out, err = invoke("upscale", tmp_path / "empty.mkv", "--model", onnx_path, "-o", tmp_path / "out" / "deep")
    assert code == 2 and "no video frames" in _one_error_line(err) and not (tmp_path / "out").exists()


def test_video_frame_size_checked_from_the_header(x2_model, tmp_path, invoke, monkeypatch):
    """A video whose header declares frames over the megapixel limit is refused before any frame is decoded."""
    onnx_path, _ = x2_model
    make_video(tmp_path / "clip.mp4", frames=2, audio=False)
    monkeypatch.setenv("DIPNET_MAX_MEGAPIXELS", "0.003")  # 3,000 px: the 64x48 frames (3,072 px) are over
    monkeypatch.setattr("dipnet_deploy.video.av.VideoFrame.to_ndarray",
                        lambda *_a, **_k: pytest.fail("a frame was decoded"))
    code, _, err = invoke("upscale", tmp_path / "clip.mp4", "--model", onnx_path, "-o", tmp_path / "out")
    line = _one_error_line(err)
    assert code == 2 and "clip.mp4" in line and "64x48" in line and "DIPNET_MAX_MEGAPIXELS" in line, err
    assert not (tmp_path / "out").exists()


def test_refuses_output_into_inputs(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), smooth_image(44, 60, 1))
    before = sorted(tmp_path.rglob("*"))
    code, _, err = invoke("upscale", src, "--model", onnx_path, "-o", src / "up")
    assert code == 2 and "inside the input folder" in _one_error_line(err)
    code, _, err = invoke("upscale", src / "a.png", "--model", onnx_path, "-o", src)  # would write over a.png
    assert code == 2 and "input" in _one_error_line(err)
    (src / "photos").mkdir()
    cv2.imwrite(str(src / "photos" / "b.png"), smooth_image(44, 60, 2))
    before = sorted(tmp_path.rglob("*"))
    code, _, err = invoke("upscale", src, "--model", onnx_path, "-o", tmp_path)  # photos/b.png -> tmp/photos/b.png
    assert code == 2 and "into the input folder" in _one_error_line(err)
    assert sorted(tmp_path.rglob("*")) == before


def test_unknown_runtime_and_missing_openvino(x2_model, tmp_path, invoke, monkeypatch):
    onnx_path, _ = x2_model
    cv2.imwrite(str(tmp_path / "a.png"), smooth_image(44, 60, 1))
    code, _, err = invoke("upscale", tmp_path / "a.png", "--model", onnx_path, "-o", tmp_path / "out", "--runtime", "tvm")
    assert code == 2 and "--runtime" in _one_error_line(err)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import raises ImportError
    for args in (("upscale", tmp_path / "a.png", "--model", onnx_path, "-o", tmp_path / "out"),
                 ("bench", "--fp32", onnx_path, "--int8", onnx_path),
                 ("compare", tmp_path / "report", "--fp32", onnx_path, "--data", tmp_path)):
        code, _, err = invoke(*args, "--runtime", "openvino")
        assert code == 2 and "pip install 'dipnet-deploy[openvino]'" in _one_error_line(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


def test_openvino_upscale_matches_onnxruntime(x2_model, tmp_path, invoke):
    pytest.importorskip("openvino")
    onnx_path, _ = x2_model
    cv2.imwrite(str(tmp_path / "a.png"), smooth_image(70, 100, 4))
    for runtime in ("onnxruntime", "openvino"):
        code, _, err = invoke("upscale", tmp_path / "a.png", "--model", onnx_path, "-o", tmp_path / runtime,
                              "--runtime", runtime)
        assert code == 0, err
    a, b = (cv2.imread(str(tmp_path / runtime / "a.png")).astype(int) for runtime in ("onnxruntime", "openvino"))
    assert np.abs(a - b).max() <= 1


def test_codec_the_container_cannot_hold_is_one_line(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    make_video(tmp_path / "clip.mp4", frames=2, audio=False)
    code, _, err = invoke("upscale", tmp_path / "clip.mp4", "--model", onnx_path, "-o", tmp_path / "out",
                          "--codec", "rawvideo")
    line = _one_error_line(err)
    assert code == 2 and "clip.mp4" in line and "cannot hold rawvideo" in line and not (tmp_path / "out").exists()


def test_truncated_video_keeps_what_decodes_and_says_so(x2_model, tmp_path, invoke):
    onnx_path, _ = x2_model
    make_video(tmp_path / "full.mkv", frames=6, audio=False)
    data = (tmp_path / "full.mkv").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    code, out, err = invoke("upscale", tmp_path / "in" / "cut.mkv", "--model", onnx_path, "-o", tmp_path / "out",
                            "--json")
    assert code == 0, err
    frames = json.loads(out.strip().splitlines()[-1])["frames"]
    assert 0 < frames < 6
    assert f"note: {tmp_path / 'in' / 'cut.mkv'}: {frames} of the 6 frames its header declares could be decoded" in err
