"""What one training or validation image of ``train`` and ``finetune`` takes in memory, from its header.

Loading an image decodes it and makes its pair (the HR cropped to the scale and its uint8 MATLAB-bicubic LR,
in bands), which the run then holds. A validation image also runs whole through the model
(``sr_protocol.run_torch_whole``); so does every ``finetune`` training image (its ranges and equalization are
measured on the whole LR), whose LR is also held as float32. An image for which this would be over the memory
budget is refused before it is decoded (``image_check``: skipped with a warning, as ``compare`` skips one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dipnet_deploy.config import DIPNetConfig
from dipnet_deploy.imageio import ImageHeader, check_memory, decode_bytes
from dipnet_deploy.matlab_resize import BAND_BYTES

# float32 tensors of the model's widest (trunk, block or ESA) width alive per LR pixel in a whole-image forward, the
# output's conversion included: a validation forward and a finetune's measuring of an image took some 5.5 (x2
# packaged and preset, x4 official)
WHOLE_FORWARD_WIDTHS = 8


@dataclass(frozen=True)
class TrainingMemory:
    """The estimates for a run of ``config``'s model: ``finetune`` (float LR held, whole-image forwards of the
    training images) or ``train``."""

    config: DIPNetConfig
    finetune: bool = False

    def held_bytes(self, header: ImageHeader, role: str) -> int:
        """Bytes the image of ``header`` holds for the whole run once loaded as a ``role`` image: its pair (and
        a finetune training image's LR as float32)."""
        hr = 3 * header.pixels
        lr = hr // self.config.upscale**2
        return hr + lr + (4 * lr if self.finetune and role == "training" else 0)

    def peak_bytes(self, header: ImageHeader, role: str) -> int:
        """Peak bytes of loading and using the image of ``header`` as a ``role`` image: decoding it; its pixels
        with the pair being made and the resize's bands; then a whole-image forward of its LR where the run
        makes one (``forward_bytes``). The model's weights and the batches are not counted."""
        scale = self.config.upscale
        held = self.held_bytes(header, role)
        loading = 3 * header.pixels + held + 6 * BAND_BYTES * scale
        whole = role == "validation" or self.finetune
        forward = held + self.forward_bytes(header.pixels // scale**2) if whole else 0
        return max(decode_bytes(header), loading, forward)

    def forward_bytes(self, lr_pixels: int) -> int:
        """Peak bytes of a whole-image forward of an LR image of ``lr_pixels`` pixels, its uint8 output made."""
        config = self.config
        widest = max(config.feature_channels, config.mid_channels, config.esa_channels if config.esa else 0)
        return 4 * lr_pixels * (WHOLE_FORWARD_WIDTHS * widest + 2 * 3 * config.upscale**2)

    def image_check(self, role: str) -> Callable[[ImageHeader], None]:
        """``read_rgb8``'s check for a ``role`` image: refuse it when ``peak_bytes`` is over the budget."""
        what = "train" if role == "training" else "validate"
        return lambda header: check_memory(header, self.peak_bytes(header, role),
                                           f"{what} x{self.config.upscale} on it")
