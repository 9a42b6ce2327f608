"""Lesson 04's assignment (assignments/causal_conv.py): the causal 3-D convolution and its streaming cache,
against the package (qwenimage_minimal.vae.CausalConv3d) and diffusers' QwenImageCausalConv3d."""

import pytest
import torch
import torch.nn.functional as F

from conftest import check, load
from qwenimage_minimal import vae

causal = load("causal_conv")
g = torch.Generator().manual_seed(0)
KERNELS = [(3, 1), ((3, 1, 1), (1, 0, 0))]  # (kernel_size, padding): the ResidualBlock conv, the time_conv
PADS_THE_FUTURE = (
    "you padded time on both sides (pt frames before, pt after): pad 2 * pt frames before the first"
)
PADS_COPIES = "you padded time with copies of the first frame: the past frames are zeros"
KEEPS_THE_FIRST = (
    "the cache keeps the chunk's *first* frames: keep the last 2 * pt frames seen (past, then x)"
)
IGNORES_THE_PAST = (
    "every chunk was padded with zeros: the previous chunk's frames (past) stand in their place"
)


def conv_layer(kernel, padding):
    with torch.random.fork_rng():  # the layer's random initial weights, the same in every run
        torch.manual_seed(0)
        layer = vae.CausalConv3d(3, 4, kernel, padding=padding)
    return (
        layer,
        layer.weight.detach(),
        layer.bias.detach(),
        (padding,) * 3 if isinstance(padding, int) else padding,
    )


def video(T, B=2, H=7, W=6):
    return torch.randn(B, 3, T, H, W, generator=g)


def chunked(conv, x, sizes, w, b, p):
    """Each chunk through conv(chunk, w, b, p, past), past = the previous call's keep -> (outputs, keeps)."""
    outs, keeps, past = [], [], None
    for chunk in x.split(sizes, dim=2):
        y, past = conv(chunk, w, b, p, past)
        outs.append(y), keeps.append(past)
    return torch.cat(outs, dim=2), keeps


@pytest.mark.parametrize("kernel, padding", KERNELS)
def test_a_whole_video_matches_the_package(kernel, padding):
    layer, w, b, (pt, ph, pw) = conv_layer(kernel, padding)
    x = video(5)
    y, keep = causal.causal_conv3d(x, w, b, (pt, ph, pw))
    replicated = F.pad(F.pad(x, (0, 0, 0, 0, 2 * pt, 0), mode="replicate"), (pw, pw, ph, ph))
    mistakes = [
        (F.conv3d(x, w, b, padding=(pt, ph, pw)), PADS_THE_FUTURE),
        (F.conv3d(replicated, w, b), PADS_COPIES),
    ]
    with torch.no_grad():
        check(f"causal_conv3d(kernel {kernel}, padding {padding}), y", y, layer(x), mistakes)
    check(
        "causal_conv3d's keep (the last 2 * pt frames)",
        keep,
        x[:, :, -2 * pt :],
        [(x[:, :, : 2 * pt], KEEPS_THE_FIRST)],
    )


# [1, 4, 4]: as the VAE's encoder streams a video, the first frame alone, then 4 at a time
@pytest.mark.parametrize("sizes", [[1, 4, 4], [2, 3], [3, 1, 1]])
def test_chunk_by_chunk_equals_the_whole_video(sizes):
    layer, w, b, p = conv_layer(3, 1)
    x = video(sum(sizes))
    with torch.no_grad():
        whole = layer(x)
    got, keeps = chunked(causal.causal_conv3d, x, sizes, w, b, p)
    seen = 0
    for size, keep in zip(sizes, keeps):
        seen += size
        expected = x[:, :, max(0, seen - 2) : seen]
        check(
            f"keep after the frames {seen - size}..{seen - 1}",
            keep,
            expected,
            [(x[:, :, seen - size :][:, :, :2], KEEPS_THE_FIRST)],
        )
    first_frames = lambda chunk, w, b, p, past: (F.conv3d(cat_or_pad(past, chunk, p), w, b), chunk[:, :, :2])
    zeros_only = lambda chunk, w, b, p, past: (F.conv3d(cat_or_pad(None, chunk, p), w, b), None)
    mistakes = [
        (chunked(first_frames, x, sizes, w, b, p)[0], KEEPS_THE_FIRST),
        (chunked(zeros_only, x, sizes, w, b, p)[0], IGNORES_THE_PAST),
    ]
    check(f"chunks {sizes} concatenated, against the whole video", got, whole, mistakes)


def cat_or_pad(past, chunk, p):
    """[past, chunk], padded in front to 2 * pt past frames with zeros, and in space."""
    x = chunk if past is None else torch.cat([past, chunk], dim=2)
    return F.pad(x, (p[2], p[2], p[1], p[1], 2 * p[0] - (x.shape[2] - chunk.shape[2]), 0))


# past_frames 1: after the encoder's one-frame first chunk the past holds a single frame
@pytest.mark.parametrize("past_frames", [1, 2])
@pytest.mark.parametrize("kernel, padding", KERNELS)
def test_a_chunk_after_a_past_matches_diffusers(kernel, padding, past_frames):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    layer, w, b, p = conv_layer(kernel, padding)
    with torch.random.fork_rng():  # its random initial weights are replaced by the layer's just below
        reference = QwenImageCausalConv3d(3, 4, kernel, padding=padding)
    reference.load_state_dict(layer.state_dict())
    x, past = video(4), video(past_frames)
    y, keep = causal.causal_conv3d(x, w, b, p, past)
    with torch.no_grad():
        check(
            "causal_conv3d(x, ..., past) against diffusers' QwenImageCausalConv3d(x, cache_x=past)",
            y,
            reference(x, cache_x=past),
        )
    check("keep after a chunk with a past", keep, x[:, :, -2:], [(x[:, :, :2], KEEPS_THE_FIRST)])


def test_one_frame_is_a_2d_conv_with_the_last_kernel_slice():
    _, w, b, p = conv_layer(3, 1)
    x = video(1)
    y, _ = causal.causal_conv3d(x, w, b, p)
    check("causal_conv3d on one frame", y[:, :, 0], F.conv2d(x[:, :, 0], w[:, :, -1], b, padding=1))
