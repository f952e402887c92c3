"""Running a fixed-shape SR ONNX on an LR image of any size: tiles with a halo, stitched.

Tiles have the model's input shape and overlap by twice the halo; each tile contributes only
its core (the halo trimmed wherever the tile edge is not the image edge). With a halo at least
the receptive-field radius, a purely convolutional model gives exactly the whole-image result
for images at least one tile large. An image smaller than a tile along an axis is padded by mirroring
(numpy "symmetric") to the tile; the padding then influences a band near that edge, and models
with global attention (ESA) see the padding and the tile boundaries everywhere. Mirroring came
out closest to a whole-image run among the padding modes tried (mean Set5 Y-PSNR deviation:
official x4 +0.002 dB, packaged x2 -0.005 dB; edge replication -0.085 / -0.009 dB, "reflect"
-0.001 / -0.018 dB, zeros -0.43 / -0.42 dB: zero input is not the zero padding every layer sees
in a whole-image run). The evaluation
reports these deviations instead of hiding them.

Images (``TiledRunner.bands``) go tile by tile from the 8-bit RGB image: each tile is made
float32 (``sr_protocol.to_input``'s arithmetic), run, and its core rounded to uint8 (``imageio.to_uint8_rgb``'s)
straight into the output rows, which come out one band (a row of tiles) at a time. No float copy of
the whole image, padded or not, exists: the result is the whole-image ``run``'s, rounded, exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from dipnet_deploy.errors import InputError
from dipnet_deploy.runtime import open_session

GLOBAL_OPS = {"Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}


@dataclass(frozen=True)
class ReceptiveField:
    radius: int  # LR pixels a local output depends on, each side
    local: bool  # False when some op (ESA's pooling + resize) sees far beyond the radius


def receptive_field(model: onnx.ModelProto) -> ReceptiveField:
    """Longest chain of conv reach from the input to the output, and whether it is all local."""
    radius = {vi.name: 0 for vi in model.graph.input}
    local = True
    for node in model.graph.node:
        reach = max((radius.get(name, 0) for name in node.input if name in radius), default=0)
        if node.op_type == "Conv":
            attrs = {a.name: a for a in node.attribute}
            weight_shape = next((list(i.dims) for i in model.graph.initializer if i.name == node.input[1]), None)
            kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else (weight_shape or [1, 1, 1, 1])[2:]
            dilation = list(attrs["dilations"].ints) if "dilations" in attrs else [1, 1]
            if "strides" in attrs and any(s != 1 for s in attrs["strides"].ints):
                local = False
            reach += max((k - 1) // 2 * d for k, d in zip(kernel, dilation))
        elif node.op_type in GLOBAL_OPS:
            local = False
        for out in node.output:
            radius[out] = reach
    return ReceptiveField(radius.get(model.graph.output[0].name, 0), local)


def smallest_tile(field: ReceptiveField) -> int:
    """Smallest input side ``TiledRunner`` can tile exactly: one core pixel between two halos of radius + 1.

    Models with a global field (ESA) get a halo that shrinks to fit, so any side works for them (0).
    """
    return 2 * (field.radius + 1) + 1 if field.local else 0


CONVERT_ROWS = 256  # output rows of a tile rounded to uint8 at once (a float32 scratch of that many rows)


def _mirrored(length: int, tile: int) -> np.ndarray | None:
    """Indices of a side of ``length`` px mirror-padded to ``tile`` (np.pad's "symmetric"); None when it
    is at least a tile long (not padded)."""
    return None if length >= tile else np.pad(np.arange(length), (0, tile - length), mode="symmetric")


def _round_into(chw: np.ndarray, hwc: np.ndarray) -> None:
    """``hwc[...] = imageio.to_uint8_rgb(chw[None])``, the same arithmetic (x 255 in float32, clip, round half
    to even), a few rows at a time."""
    for start in range(0, chw.shape[1], CONVERT_ROWS):
        part = np.multiply(chw[:, start:start + CONVERT_ROWS], 255.0)
        np.clip(part, 0, 255, out=part)
        np.round(part, out=part)
        hwc[start:start + CONVERT_ROWS] = part.transpose(1, 2, 0)


def tile_starts(length: int, tile: int, halo: int) -> list[int]:
    """Start offsets of tiles covering [0, length); cores abut (step = tile - 2 * halo)."""
    if length <= tile:
        return [0]
    step = tile - 2 * halo
    if step <= 0:
        raise ValueError(f"tile {tile} too small for halo {halo}")
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def core(start: int, tile: int, length: int, halo: int) -> tuple[int, int]:
    """Region of [start, start + tile) whose output is exact: halo trimmed at interior edges."""
    begin = start + halo if start > 0 else 0
    end = start + tile - halo if start + tile < length else min(length, start + tile)
    return begin, end


def final_cores(length: int, tile: int, halo: int) -> list[tuple[int, int, int]]:
    """(start, begin, end) of each tile along a side: the part of its core no later tile overwrites in ``run``
    (the last tile's core may overlap the one before; cores otherwise abut). These parts cover [0, length)."""
    starts = tile_starts(length, tile, halo)
    cores = [core(start, tile, length, halo) for start in starts]
    ends = [begin for begin, _ in cores[1:]] + [cores[-1][1]]
    return [(start, begin, min(end, last)) for start, (begin, end), last in zip(starts, cores, ends)]


class TiledRunner:
    """Runs an ONNX SR model with fixed input [1, 3, H, W] on [1, 3, h, w] inputs of any size.

    The one tiling implementation: ``compare`` and ``upscale`` both go through ``run``. ``runtime``
    is one of ``runtime.RUNTIMES``; ``threads`` bounds the CPU threads of one forward.
    """

    def __init__(self, model_path: str, threads: int | None = None, halo: int | None = None,
                 runtime: str = "onnxruntime"):
        model = onnx.load(str(model_path))
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        self.tile_h, self.tile_w = dims[2], dims[3]
        self.scale = out_dims[2] // dims[2] if out_dims and out_dims[2] else None
        self.field = receptive_field(model)
        self.halo = self.field.radius + 1 if halo is None else halo
        # Tiles must keep a core between their halos; ESA models (global field) get what fits.
        self.halo = min(self.halo, (min(self.tile_h, self.tile_w) - 1) // 4) if not self.field.local else self.halo
        if 2 * self.halo >= min(self.tile_h, self.tile_w):
            raise InputError(model_path, f"model input {self.tile_h}x{self.tile_w} is too small to tile with a halo "
                                         f"of {self.halo} px (its receptive field); export it at a larger size")
        self.runtime = runtime
        self.session = open_session(model_path, runtime, threads)

    def forward(self, tile: np.ndarray) -> np.ndarray:
        return self.session.run(tile)

    def tiles(self, lr: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(top, left, [1, 3, H, W] model input) of each tile of a [1, 3, h, w] float32 input, row by row.

        Inputs smaller than the model's are mirror-padded.
        """
        _, _, height, width = lr.shape
        padded = np.pad(lr, ((0, 0), (0, 0), (0, max(0, self.tile_h - height)), (0, max(0, self.tile_w - width))),
                        mode="symmetric")
        for top in tile_starts(height, self.tile_h, self.halo):
            for left in tile_starts(width, self.tile_w, self.halo):
                yield top, left, np.ascontiguousarray(padded[:, :, top:top + self.tile_h, left:left + self.tile_w])

    def tile_count(self, height: int, width: int) -> int:
        """Tiles of an ``height`` x ``width`` input."""
        return len(tile_starts(height, self.tile_h, self.halo)) * len(tile_starts(width, self.tile_w, self.halo))

    def band_rows(self, height: int) -> int:
        """Output rows of the tallest band ``bands`` yields for an input ``height`` rows tall."""
        return max(end - begin for _, begin, end in final_cores(height, self.tile_h, self.halo)) * self.scale

    def bands(self, rgb: np.ndarray, out: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """HxWx3 uint8 RGB -> its (rH)x(rW)x3 uint8 RGB upscaled, rounded, one band (the final output rows of
        a row of tiles, top to bottom) at a time: views of ``out`` when it is given (filled in as the bands
        come), else new arrays. Equal to ``to_uint8_rgb(run(to_input(rgb))[0])``, exactly: where the cores
        of the last two tiles of a side overlap, the later tile's pixels are kept, as ``run`` keeps them."""
        height, width = rgb.shape[:2]
        r = self.scale
        if out is not None and (out.shape != (height * r, width * r, 3) or out.dtype != np.uint8):
            raise ValueError(f"out must be {height * r}x{width * r}x3 uint8, not {out.dtype} {out.shape}")
        rows, columns = _mirrored(height, self.tile_h), _mirrored(width, self.tile_w)
        x = np.empty((1, 3, self.tile_h, self.tile_w), np.float32)
        for top, y0, y1 in final_cores(height, self.tile_h, self.halo):
            band = np.empty(((y1 - y0) * r, width * r, 3), np.uint8) if out is None else out[y0 * r:y1 * r]
            for left, x0, x1 in final_cores(width, self.tile_w, self.halo):
                if rows is None and columns is None:
                    x[0] = rgb[top:top + self.tile_h, left:left + self.tile_w].transpose(2, 0, 1)
                elif rows is None:  # narrower than a tile: mirror-padded to it, as np.pad(mode="symmetric")
                    x[0] = rgb[top:top + self.tile_h][:, columns].transpose(2, 0, 1)
                else:  # lower than a tile (and maybe narrower): the same, the columns taken first
                    x[0] = rgb[:, slice(left, left + self.tile_w) if columns is None else columns][rows].transpose(2, 0, 1)
                x /= 255.0  # to_input's arithmetic: float32(value) / 255 in float32
                result = self.forward(x)
                _round_into(result[0, :, (y0 - top) * r:(y1 - top) * r, (x0 - left) * r:(x1 - left) * r],
                            band[:, x0 * r:x1 * r])
                del result  # before the next forward makes its own
            yield band
            del band  # a band the caller let go of is gone before the next one is made

    def run_rgb8(self, rgb: np.ndarray) -> tuple[np.ndarray, int]:
        """HxWx3 uint8 RGB -> ((rH)x(rW)x3 uint8 RGB, number of tiles): ``bands`` into one array."""
        out = np.empty((rgb.shape[0] * self.scale, rgb.shape[1] * self.scale, 3), np.uint8)
        for _ in self.bands(rgb, out):
            pass
        return out, self.tile_count(*rgb.shape[:2])

    def run(self, lr: np.ndarray) -> tuple[np.ndarray, int]:
        """[1, 3, h, w] float32 -> ([1, 3, h*r, w*r] float32, number of tiles)."""
        _, channels, height, width = lr.shape
        if (height, width) == (self.tile_h, self.tile_w):  # one tile, no padding (a 1080p video frame): no copies
            return self.forward(np.ascontiguousarray(lr, dtype=np.float32)), 1
        r = self.scale
        out = np.zeros((1, channels, height * r, width * r), dtype=np.float32)
        count = 0
        for top, left, tile in self.tiles(lr):
            y0, y1 = core(top, self.tile_h, height, self.halo)
            x0, x1 = core(left, self.tile_w, width, self.halo)
            result = self.forward(tile)
            out[:, :, y0 * r:y1 * r, x0 * r:x1 * r] = \
                result[:, :, (y0 - top) * r:(y1 - top) * r, (x0 - left) * r:(x1 - left) * r]
            count += 1
        return out, count
