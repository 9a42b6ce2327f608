"""Pictures in and out: everything between a user's image and a tensor, and back.

    any image (PIL, array, tensor) ─ to_rgb ─> PIL RGB
        ├─ resize to an area (Edit: ~1024² for the VAE, ~384² for the vision tower) ─ to_tensor ─> (1, 3, H, W) in [-1, 1]
        └─ the vision tower's processor (preprocess) ─> 14x14 patches (N, 1176) and their grid (1, h, w)
    decoded (B, 3, H, W) in [-1, 1] ─ postprocess ─> PIL images / arrays / tensors in [0, 1]

The processor is what transformers' Qwen2VLImageProcessor does, in numpy and PIL:

    RGB -> resized so both sides are multiples of 28 (= 14 px patch x 2x2 merge) with the area in
    [min_pixels, max_pixels] -> bicubic -> /255 -> CLIP mean/std -> the frame repeated to the temporal
    patch size 2 (the tower is also a video model) -> 14x14 patches, listed so that each 2x2 group of
    neighbours is consecutive -> pixel_values (h*w, 3*2*14*14 = 1176) and grid_thw = (1, h, w).

The prompt then holds (h/2)(w/2) `<|image_pad|>` tokens for this image: one per 2x2 group.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from . import weights, writing

# ---------------------------------------------------------------------------------------------
# A file -> PIL image, any image -> PIL RGB
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own limit: about 9459 x 9459


def open_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "image"):
    """Read an image file: refused when it is not an image or has more than `max_pixels` pixels
    (a decompression bomb: a small file that claims a huge size), the first frame of an animation
    (with a warning), turned upright by its EXIF orientation (as cameras and phones store it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name} {path}: no such file")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit, checked below, replaces PIL's
    try:
        image = Image.open(path)  # reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name} {path}: not an image PIL can read ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if max_pixels is not None and image.width * image.height > max_pixels:
        image.close()
        raise ValueError(
            f"{name} {path} is {image.width}x{image.height} = {image.width * image.height:,} pixels, over "
            f"the limit of {max_pixels:,} (a decompression bomb?); if the file is genuine, raise the "
            "limit (max_pixels=, --max-image-pixels)"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        warnings.warn(
            f"{name} {path} is animated ({frames} frames): only the first frame is used", stacklevel=2
        )
    try:
        image.load()
    except OSError as e:
        image.close()
        raise ValueError(f"{name} {path}: the file is damaged ({e})") from None
    upright = ImageOps.exif_transpose(image)
    if upright is not image:
        image.close()  # the file handle of the original
    return upright


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header alone, as open_image will turn it (EXIF orientations 5-8
    swap the sides): the training loop sizes every image before it reads the pixels, once, to cache them."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path}: not an image PIL can read ({e}); fix or remove it") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_pixels(path: Path, size: tuple[int, int], what: str = "image") -> torch.Tensor:
    """Image file -> (1, 3, h, w) in [-1, 1]: resized to cover `size` (aspect kept), center crop."""
    try:
        image = to_rgb(open_image(path, name=what), name=what)
        image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot be read ({e}); fix or remove it") from None
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize(
        (max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS
    )
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return to_tensor(image.crop((left, top, left + w, top + h)))


def to_rgb(image, name: str = "image"):
    """A PIL image, an (H, W, C) numpy array or a (C, H, W) / (1, C, H, W) tensor -> PIL RGB image.

    Arrays and tensors hold uint8 0..255, uint16 0..65535 or floats in [0, 1] (as in diffusers),
    with 1, 3 or 4 channels. Transparency (RGBA, LA, palette images with a transparent colour) is
    composited on white, as transformers' processor does; palette ("P") and grey images are
    converted; 16-bit, 32-bit integer and float grey images ("I;16", "I", "F") are scaled from
    their range to 8 bits rather than clipped. Everything is rounded to 8 bits: the vision
    tower's processor works on 8-bit images anyway."""
    if isinstance(image, (str, Path)):
        raise TypeError(f"{name} is a path ({image!r}); open it first: PIL.Image.open(path)")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"{name}: a tensor must be (C, H, W) or (1, C, H, W) with C in 1, 3, 4, "
                f"got {tuple(image.shape)}"
            )
        image = t.permute(1, 2, 0).float().numpy() if t.is_floating_point() else t.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{name}: an array must be (H, W) or (H, W, C) with C in 1, 3, 4, got {image.shape}"
            )
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{name} is empty: {image.shape}")
        if a.dtype == np.uint16:
            a = (a.astype(np.float64) * (255 / 65535)).round()
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError(
                    f"{name}: float arrays/tensors must hold values in [0, 1], got "
                    f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]"
                )
            a = (a * 255).round()
        elif a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{name}: integer arrays must hold 0..255, got [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
        image = Image.fromarray(
            a[..., 0] if a.shape[-1] == 1 else a, mode={1: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1]]
        )
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} has size {image.size}: it is empty")
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integers or floats, one channel
        image = Image.fromarray(_wide_grey_to_8_bits(np.asarray(image), image.mode, name), mode="L")
    if max(image.size) / min(image.size) > 200:
        raise ValueError(
            f"{name} is {image.width}x{image.height}: aspect ratios over 200:1 are not supported "
            "(Qwen2.5-VL's image processor refuses them); crop or pad it"
        )
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _wide_grey_to_8_bits(a: np.ndarray, mode: str, name: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image -> uint8, scaled by what its type means:
    integers are 16-bit data (16-bit PNG and TIFF open as "I;16" or "I"), floats [0, 1] or 0..255."""
    low, high = float(a.min()), float(a.max())
    if mode != "F" and 0 <= low and high <= 65535:
        scale = 255 / 65535
    elif mode == "F" and 0 <= low and high <= 1:
        scale = 255.0
    elif mode == "F" and 0 <= low and high <= 255:
        scale = 1.0
    else:
        raise ValueError(
            f"{name}: a {mode!r} image with values in [{low:g}, {high:g}]: only 0..65535 (integers) or "
            "[0, 1] / 0..255 (floats) have a known meaning; convert it to 8 or 16 bits first"
        )
    return (a.astype(np.float64) * scale).round().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sizes, and image <-> tensor
# ---------------------------------------------------------------------------------------------


def calculate_dimensions(target_area: int, aspect_ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels with this width/height ratio, multiples of 32."""
    width = math.sqrt(target_area * aspect_ratio)
    height = width / aspect_ratio
    return round(width / 32) * 32, round(height / 32) * 32


def resize_to_area(image, area: int):
    """PIL image -> the same aspect ratio at about `area` pixels (multiples of 32), Lanczos, as the
    official Edit pipelines resize their inputs."""
    return image.resize(calculate_dimensions(area, image.width / image.height), Image.LANCZOS)


def to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> (1, 3, H, W) float32 in [-1, 1], what the VAE encodes."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[
        None
    ]  # (1, 3, H, W) in [0, 1]
    return 2 * x - 1


def postprocess(image: torch.Tensor, output_type: str):
    """[-1, 1] (B, 3, H, W) -> [0, 1] tensor ("pt"), (B, H, W, 3) float array ("np") or PIL images."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]


# ---------------------------------------------------------------------------------------------
# Inpainting: masks, the crop around them, and pasting the result back (as diffusers' VaeImageProcessor)
# ---------------------------------------------------------------------------------------------


def to_mask(mask, name: str = "mask_image"):
    """A mask (white = repaint, black = keep) as a PIL image in its own mode: a PIL image as it is, an array or a
    tensor as to_rgb reads it (a bool one: True = repaint). The pipelines turn it grey after resizing."""
    if isinstance(mask, (np.ndarray, torch.Tensor)) and mask.dtype in (np.bool_, torch.bool):
        mask = (mask.astype(np.uint8) if isinstance(mask, np.ndarray) else mask.to(torch.uint8)) * 255
    return mask if isinstance(mask, Image.Image) else to_rgb(mask, name)


def fit(image, width: int, height: int, crop=None, fill: bool = False):
    """PIL image -> cut to `crop` (x1, y1, x2, y2), then to width x height: stretched (Lanczos), or with `fill`
    its aspect kept and the rest filled by stretching its edge rows or columns (resize_and_fill)."""
    if crop is not None:
        image = image.crop(crop)
    return resize_and_fill(image, width, height) if fill else image.resize((width, height), Image.LANCZOS)


def mask_to_tensor(mask) -> torch.Tensor:
    """PIL mask (already fitted) -> (1, 1, H, W) float32 of 0 (keep) and 1 (repaint), grey >= 0.5 is 1."""
    grey = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)
    return (grey >= 0.5).float()[None, None]


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the mask's white pixels, `pad` pixels wider on each side, then grown to
    the width:height aspect (centred, kept inside the picture): inpainting a small region at full resolution."""
    grey = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(grey.any(axis=1)), np.flatnonzero(grey.any(axis=0))
    if len(rows) == 0:
        raise ValueError("mask_image is all black, so there is nothing to repaint: paint the region white")
    h, w = grey.shape
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    aspect = width / height
    if (x2 - x1) / (y2 - y1) > aspect:
        y1, y2 = _grow(y1, y2, (x2 - x1) / aspect, h)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * aspect, w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, length: float, size: int) -> tuple[int, int]:
    """[lo, hi) grown to `length` (whole pixels, rounded down), about its centre, shifted back inside [0, size]."""
    extra = int(length - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_and_fill(image, width: int, height: int):
    """Aspect kept, centred on a width x height RGB canvas; the bands left over are the picture's edge row (or
    column) stretched across them."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (band := height // 2 - src_h // 2) > 0:  # bands above and below
        canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        bottom = (0, resized.height, width, resized.height)
        canvas.paste(resized.resize((width, band), box=bottom), box=(0, band + src_h))
    elif ratio > src_ratio and (band := width // 2 - src_w // 2) > 0:  # bands left and right
        canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        right = (resized.width, 0, resized.width, height)
        canvas.paste(resized.resize((band, height), box=right), box=(band + src_w, 0))
    return canvas


def resize_and_crop(image, width: int, height: int):
    """Aspect kept, scaled to cover width x height, centred; what sticks out is cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    canvas = Image.new("RGB", (width, height))
    canvas.paste(
        image.resize((src_w, src_h), Image.LANCZOS), box=(width // 2 - src_w // 2, height // 2 - src_h // 2)
    )
    return canvas


def paste_back(mask, original, generated, crop=None):
    """The generated picture (of the crop box, when one was used) pasted into the original, and the original's
    pixels kept wherever the mask is black: only the repainted region changes."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if crop is not None:
        x1, y1, x2, y2 = crop
        base = Image.new("RGBA", (width, height))
        base.paste(resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
        generated = base.convert("RGB")
    out = generated.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def picture_grid(pictures: list, labels: list[str] | None = None, columns: int = 4, scale: int = 1):
    """PIL pictures in a grid, each enlarged `scale` times (nearest neighbour: pixels stay pixels), with its
    label under it wrapped to the tile's width in PIL's default font; labels=None: the pictures alone."""
    w, h = max(p.width for p in pictures) * scale, max(p.height for p in pictures) * scale
    wrapped = [
        textwrap.wrap(text, max(8, w // 6)) for text in labels or [""] * len(pictures)
    ]  # ~6 px a character
    label_h = 0 if labels is None else 4 + 11 * max(len(lines) for lines in wrapped)
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    grid = Image.new("RGB", (columns * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (picture, lines) in enumerate(zip(pictures, wrapped, strict=True)):
        x, y = (i % columns) * w, (i // columns) * (h + label_h)
        grid.paste(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST), (x, y))
        if lines:
            draw.multiline_text((x + 3, y + h + 2), "\n".join(lines), fill="black", spacing=1)
    return grid


def plot_loss(rows: list[dict], png) -> None:
    """A loss curve as a PNG (the training loop's loss.png): the loss of every row {"step", "loss", ...} of
    log.jsonl and its running mean, in PIL alone (no plotting library). Fewer than two rows: nothing is drawn."""
    if len(rows) < 2:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth, avg = [], losses[0]
    for v in losses:
        avg = 0.9 * avg + 0.1 * v
        smooth.append(avg)
    W, H, m = 640, 360, 48
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1

    def xy(step, value):  # data -> pixel coordinates inside the frame
        x = m + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * m)
        return x, H - m - (value - lo) / (hi - lo) * (H - 2 * m)

    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(150, 170, 230), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 40, 160), width=2)
    d.text((m, 12), f"training loss (running mean in dark blue), steps {steps[0]}-{steps[-1]}", fill="black")
    d.text((4, m - 6), f"{hi:.3g}", fill="black")
    d.text((4, H - m - 6), f"{lo:.3g}", fill="black")
    with writing.atomic_write(png) as f:
        image.save(f, format="PNG")


def check_output_path(path, overwrite: bool = False, name: str = "--out") -> Path:
    """Before any work: `path` names an image file PIL can write (by its extension), is not a
    folder, does not exist unless `overwrite`, and its folder can be written."""
    path = Path(path)
    formats = Image.registered_extensions()
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder: give a file name such as {path / 'image.png'}")
    if path.suffix.lower() not in formats or formats[path.suffix.lower()] not in Image.SAVE:
        known = ", ".join(
            sorted(
                e
                for e, f in formats.items()
                if f in Image.SAVE and e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff")
            )
        )
        raise ValueError(
            f"{name} {path}: the extension {path.suffix or '(none)'!r} names no image format PIL can "
            f"write (use one of {known})"
        )
    if path.exists() and not overwrite:
        raise ValueError(f"{name} {path} already exists: pass --overwrite to replace it")
    writing.check_writable_folder(path.parent, f"{name} {path}", create=False)
    return path


def save_image(image, path) -> None:
    """Save a PIL image all or nothing (writing.atomic_write): a failed write leaves the old file as it was."""
    path = Path(path)
    with writing.atomic_write(path) as f:
        image.save(f, format=Image.registered_extensions()[path.suffix.lower()])


# ---------------------------------------------------------------------------------------------
# The vision tower's image processor
# ---------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessorConfig:
    """Defaults are Qwen2.5-VL's preprocessor_config.json, which Edit checkpoints carry in processor/."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384  # 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def to_json(self) -> dict:
        """processor/preprocessor_config.json, as the official Edit checkpoints write it."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "resample": 3,
            **fields,
        }


def processor_config_from_json(raw: dict, path="<preprocessor_config.json>") -> ImageProcessorConfig:
    """Both forms: `min_pixels`/`max_pixels` (official files) or `size: {shortest_edge, longest_edge}` (5.x)."""
    size = raw.get("size") or {}
    fields = dict(
        min_pixels=raw.get("min_pixels", size.get("shortest_edge")),
        max_pixels=raw.get("max_pixels", size.get("longest_edge")),
    )
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
        fields[key] = raw.get(key)
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise weights.CheckpointError(f"{path} is missing {missing}")
    resample = raw.get("resample", 3)
    if resample != 3:
        raise weights.CheckpointError(
            f"{path}: resample={resample}; only 3 (bicubic), the official value, is supported"
        )
    return ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_processor_config(folder) -> ImageProcessorConfig:
    """Read an Edit checkpoint's `processor/preprocessor_config.json`."""
    return processor_config_from_json(
        weights.read_config(folder, "preprocessor_config.json"), Path(folder) / "preprocessor_config.json"
    )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384
) -> tuple[int, int]:
    """The size the vision tower sees: both sides multiples of `factor`, close to the input's
    aspect ratio, the area within [min_pixels, max_pixels]. (to_rgb has refused ratios over 200:1.)"""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(image, config: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[torch.Tensor, tuple]:
    """image -> (pixel_values (h*w, C*T*P*P) float32, grid_thw (1, h, w) in patches)."""
    c = config
    image = to_rgb(image)
    H, W = smart_resize(image.height, image.width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
    pixels = np.asarray(image.resize((W, H), Image.BICUBIC))  # (H, W, 3) uint8
    # Rescale in float64 then cast, normalise in float32: the same roundings as transformers.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(c.image_mean, np.float32)) / np.array(c.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # (3, H, W)

    p, m, T = c.patch_size, c.merge_size, c.temporal_patch_size
    gh, gw = H // p, W // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, 3, p, p): 2x2 groups together
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, p, p))  # one image = T identical frames
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * T * p * p)), (1, gh, gw)


def image_token_count(grid_thw, merge_size: int = 2) -> int:
    """How many `<|image_pad|>` tokens an image of this patch grid takes: one per merged 2x2 group."""
    t, h, w = grid_thw
    return t * h * w // merge_size**2
