"""FFCV pipeline operations whose random draws are pure functions of (seed, epoch, sample index).

FFCV's own `RandomResizedCropRGBImageDecoder` draws from numba's `np.random` in parallel threads,
which nothing seeds. `SeededRandomResizedCrop` draws the crop of each sample from a counter-based
hash of an epoch key and the sample index instead, so a crop depends neither on the thread that
decodes it nor on the batches read before it. FFCV compiles its pipeline once; the epoch key
reaches the compiled code through a one-element array whose address is compiled in.

Importing this module imports FFCV (and numba): import it only where FFCV is in use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from debiformer.data.draws import DRAWS_PER_CROP, random_crop_box, stream_seed

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT1, _SHIFT2, _SHIFT3 = np.uint64(30), np.uint64(27), np.uint64(31)
_MANTISSA_SHIFT = np.uint64(11)
_TO_UNIT = 1.0 / 2.0**53


@intrinsic
def _pointer(typingctx, address):
    """The integer `address` as a void pointer (numba has no cast from integers to pointers)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.uint64), codegen


@njit(nogil=True)
def _splitmix64(state: np.uint64) -> np.uint64:
    """SplitMix64's output function: a well-mixed 64-bit hash of `state`."""
    z = (state ^ (state >> _SHIFT1)) * _MIX1
    z = (z ^ (z >> _SHIFT2)) * _MIX2
    return z ^ (z >> _SHIFT3)


@njit(nogil=True)
def _fill_uniforms(key: np.uint64, index: np.uint64, out: np.ndarray) -> None:
    """`out[k]` = the k-th uniform draw in [0, 1) of sample `index` under the epoch `key`."""
    base = _splitmix64(key ^ _splitmix64(index + _GOLDEN))
    for k in range(len(out)):
        out[k] = (_splitmix64(base + _GOLDEN * np.uint64(k + 1)) >> _MANTISSA_SHIFT) * _TO_UNIT


def crop_uniforms(key: int, index: int) -> np.ndarray:
    """The uniform draws of the crop of sample `index` under the epoch `key` (for tests)."""
    out = np.empty(DRAWS_PER_CROP)
    _fill_uniforms(np.uint64(key), np.uint64(index), out)
    return out


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV's random resized crop decoder with each sample's crop drawn from (epoch key, index).

    Call `set_epoch(seed, epoch)` before reading an epoch; the key is read when a batch is decoded.
    """

    def __init__(self, output_size: tuple[int, int], scale: tuple, ratio: tuple):
        super().__init__(output_size)
        self.scale = np.array(scale, dtype=np.float64)
        self.ratio = np.array(ratio, dtype=np.float64)
        self.epoch_key = np.zeros(1, dtype=np.uint64)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Crop the samples of `epoch` from now on."""
        self.epoch_key[0] = stream_seed(seed, epoch)

    @property
    def get_crop_generator(self) -> Callable:
        """The crop function (the base class requires it; `generate_code` draws its arguments)."""
        return random_crop_box

    def generate_code(self) -> Callable:
        """FFCV's ResizedCropRGBImageDecoder decode loop with the crop box drawn per sample."""
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_box_c = Compiler.compile(random_crop_box)
        scale, ratio = self.scale, self.ratio
        key_address = np.uint64(self.epoch_key.ctypes.data)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = carray(_pointer(key_address), 1, np.uint64)[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(
                        image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False,
                        False,
                    )  # fmt: skip
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                uniforms = np.empty(DRAWS_PER_CROP)
                _fill_uniforms(key, np.uint64(source_ix), uniforms)
                i, j, h, w = crop_box_c(height, width, scale, ratio, uniforms)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
