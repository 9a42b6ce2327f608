"""What a hostile (or unlucky) user tries: faults while writing, files that lie, numbers out of range,
bad images and prompts. Each case asserts the clear error (naming the argument, file or tensor) or the
correct result, and for writes that the previous good output survives and the source is never touched."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import weights_convert
from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import images, mmdit, pipeline, sizes, text_encoder, tokenizer, vae, weights, writing

ROOT = Path(__file__).resolve().parents[1]
STEM = mmdit.WEIGHTS_STEM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("bad") / "tiny", "tiny")


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (names relative to it) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


class FullDisk:
    """A file whose writes fail with ENOSPC once the disk's `free` bytes, shared by every file, are used."""

    def __init__(self, f, disk):
        self.f, self.disk = f, disk

    def write(self, data):
        if len(data) > self.disk["free"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.disk["free"] -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_the_disk_after(monkeypatch, free):
    real, disk = os.fdopen, {"free": free}
    monkeypatch.setattr(weights.os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), disk))


# ---------------------------------------------------------------------------------------------
# The converter never loses data
# ---------------------------------------------------------------------------------------------


def test_converter_refuses_to_replace_its_own_source(tiny, tmp_path):
    """Before: converting v/diffusion_pytorch_model.safetensors into v with --overwrite deleted the
    source before reading it ("No such file or directory", only a .partial left)."""
    v = tmp_path / "v"
    v.mkdir()
    src = v / f"{STEM}.safetensors"
    shutil.copy(tiny / "transformer" / f"{STEM}.safetensors", src)
    before = snapshot(v)
    with pytest.raises(
        ValueError, match=rf"the source {src} is one of the files that converting into {v} replaces"
    ):
        weights_convert.convert(src, v, overwrite=True, config_path=tiny / "transformer" / "config.json")
    assert snapshot(v) == before and leftovers(tmp_path) == []


def test_converter_leaves_a_source_with_a_similar_name_alone(tiny, tmp_path):
    """Before: a text-encoder source named model_comfy.safetensors matched the stale-shard pattern
    model*.safetensors and was deleted. Now only the exact output names are replaced."""
    te = tmp_path / "te"
    te.mkdir()
    src = te / "model_comfy.safetensors"
    shutil.copy(tiny / "text_encoder" / "model.safetensors", src)
    before = src.read_bytes()
    weights_convert.convert(
        src,
        te,
        component="text_encoder",
        overwrite=True,
        config_path=tiny / "text_encoder" / "config.json",
        log=lambda *a: None,
    )
    assert src.read_bytes() == before
    a, b = text_encoder.load(tiny / "text_encoder"), text_encoder.load(te)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("to_file", [False, True], ids=["folder", "single file"])
def test_a_full_disk_mid_write_keeps_the_previous_output(tiny, tmp_path, monkeypatch, to_file):
    """Before: --overwrite removed the old output first, so a full disk left neither; the error was a
    raw traceback. Now the old output is intact, nothing is left behind, and the error is one sentence."""
    out = tmp_path / ("t.safetensors" if to_file else "t")
    weights_convert.convert(
        tiny / "transformer", out, max_shard_size=weights_convert.parse_size("100KB"), log=lambda *a: None
    )
    before = snapshot(tmp_path)
    fill_the_disk_after(monkeypatch, 200_000)
    with pytest.raises(
        writing.OutputError, match=rf"cannot write {out}: the disk is full; the previous output"
    ):
        weights_convert.convert(
            tiny / "transformer",
            out,
            overwrite=True,
            dtype=torch.bfloat16,
            max_shard_size=weights_convert.parse_size("100KB"),
            log=lambda *a: None,
        )
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_not_enough_free_space_is_said_before_writing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(
        weights_convert.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000)
    )
    with pytest.raises(
        writing.OutputError, match=r"needs 0.00 GiB and the disk has 0.00 GiB free; nothing was changed"
    ):
        weights_convert.convert(tiny / "transformer", tmp_path / "t", log=lambda *a: None)
    assert not (tmp_path / "t").exists() and leftovers(tmp_path) == []


def test_a_kill_mid_write_keeps_the_previous_output(tiny, tmp_path):
    """The process is killed (SIGKILL) while it writes the new shards: the old output is intact, and
    the next run clears the leftover and succeeds."""
    out = tmp_path / "t"
    weights_convert.convert(
        tiny / "transformer", out, max_shard_size=weights_convert.parse_size("100KB"), log=lambda *a: None
    )
    before = snapshot(out)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, weights_convert
from qwenimage_minimal import weights
read, calls = weights.SafetensorsFile.read, [0]
def dying(self, name, file=None):
    calls[0] += 1
    if calls[0] == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, name, file)
weights.SafetensorsFile.read = dying
weights_convert.convert({str(tiny / "transformer")!r}, {str(out)!r}, overwrite=True, dtype=torch.bfloat16,
                        max_shard_size=weights_convert.parse_size("100KB"))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert snapshot(out) == before and leftovers(tmp_path)  # the old output, and the killed run's debris
    weights_convert.convert(
        tiny / "transformer", out, overwrite=True, dtype=torch.bfloat16, log=lambda *a: None
    )
    assert leftovers(tmp_path) == [] and mmdit.load(out).img_in.weight.dtype == torch.bfloat16


def test_converter_destination_errors(tiny, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(writing.OutputError, match="a_file is a file, not a folder"):
        weights_convert.convert(tiny / "transformer", tmp_path / "a_file" / "t", log=lambda *a: None)
    with pytest.raises(FileExistsError, match="exists and is a file, but the output is a folder"):
        weights_convert.convert(
            tiny / "transformer", tmp_path / "a_file", overwrite=True, log=lambda *a: None
        )
    assert (
        weights_convert.main([str(tiny / "transformer"), str(tmp_path / "a_file" / "t")]) == 2
    )  # one line, no traceback


# ---------------------------------------------------------------------------------------------
# Every save is atomic: images too
# ---------------------------------------------------------------------------------------------


def test_a_failed_image_write_keeps_the_previous_image(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    images.save_image(Image.new("RGB", (32, 16), (200, 10, 10)), path)
    before = path.read_bytes()
    fill_the_disk_after(monkeypatch, 100)
    with pytest.raises(writing.OutputError, match="out.png: the disk is full"):
        images.save_image(Image.effect_noise((64, 64), 50).convert("RGB"), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]


# ---------------------------------------------------------------------------------------------
# The loader reads nothing from outside the folder, and believes no header blindly
# ---------------------------------------------------------------------------------------------


def sharded_copy(tiny, dst: Path) -> Path:
    weights_convert.convert(
        tiny / "transformer", dst, max_shard_size=weights_convert.parse_size("100KB"), log=lambda *a: None
    )
    return dst


def rewrite_index(folder: Path, change) -> None:
    index = folder / f"{STEM}.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE"])
def test_an_index_pointing_outside_the_folder_is_refused(tiny, tmp_path, where):
    """Before: "../../x.safetensors" or an absolute path in the index was loaded silently, and copied
    by the converter."""
    folder = sharded_copy(tiny, tmp_path / "t")
    first = sorted(folder.glob(f"{STEM}-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(first, outside)
    target = str(outside) if where == "ABSOLUTE" else where
    rewrite_index(folder, lambda m: m.update({k: target for k, v in m.items() if v == first.name}))
    with pytest.raises(weights.CheckpointError, match="is not a plain file name inside the folder"):
        mmdit.load(folder)
    with pytest.raises(weights.CheckpointError, match="refusing to read outside the checkpoint"):
        weights_convert.convert(folder, tmp_path / "copy", log=lambda *a: None)


def test_a_symlink_out_of_the_folder_is_refused_but_the_hugging_face_cache_works(tiny, tmp_path):
    folder = sharded_copy(tiny, tmp_path / "t")
    first = sorted(folder.glob(f"{STEM}-*.safetensors"))[0]
    shutil.move(first, tmp_path / "elsewhere.safetensors")
    first.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(
        weights.CheckpointError, match=r"is a link to .*elsewhere.safetensors, outside the checkpoint"
    ):
        mmdit.load(folder)
    # huggingface_hub's cache: snapshots/<rev>/transformer/* are links into the repository's blobs/
    repo = tmp_path / "hub" / "models--Qwen--Qwen-Image"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc" / "transformer"
    snap.mkdir(parents=True)
    for f in (tiny / "transformer").iterdir():
        shutil.copy(f, repo / "blobs" / f"sha-{f.name}")
        (snap / f.name).symlink_to(Path("../../../blobs") / f"sha-{f.name}")
    assert torch.equal(mmdit.load(snap).img_in.weight, mmdit.load(tiny / "transformer").img_in.weight)


def test_a_link_into_a_sibling_pipeline_folder_is_read_and_one_into_any_other_folder_is_not(tiny, tmp_path):
    """checkpoints/nano_edit links to checkpoints/nano's files: a link from one pipeline folder (its own
    model_index.json) into another beside it is read; the same file in a folder that is not a pipeline is not."""
    base, built = tmp_path / "base", tmp_path / "built"
    shutil.copytree(tiny, base)
    (built / "transformer").mkdir(parents=True)
    shutil.copy(tiny / "model_index.json", built / "model_index.json")
    for f in (tiny / "transformer").iterdir():
        (built / "transformer" / f.name).symlink_to(Path("../../base/transformer") / f.name)
    assert torch.equal(
        mmdit.load(built / "transformer").img_in.weight, mmdit.load(base / "transformer").img_in.weight
    )
    (base / "model_index.json").unlink()  # base is no longer a pipeline folder: the links lead outside
    with pytest.raises(weights.CheckpointError, match="outside the checkpoint"):
        mmdit.load(built / "transformer")


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    "header, message",
    [
        (
            {"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}},
            "corrupt header entry for tensor 'w'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}},
            "corrupt header entry for tensor 'w'",
        ),
        (
            {"w": {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}},
            "corrupt header entry for tensor 'w'",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "tensors 'w' and 'v' overlap",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            r"\['w'\] appear more than once",
        ),
        ([1, 2], "not a JSON object"),
        ({"__metadata__": {"format": 1}}, "__metadata__ must map names to strings"),
    ],
)
def test_headers_are_checked_for_type_and_overlap(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(
        path, json.dumps(header).encode() if isinstance(header, list) else header, bytes(16)
    )
    with pytest.raises(weights.CheckpointError, match=message):
        weights.SafetensorsFile(path)


def test_integer_tensors_where_floats_belong_are_named(tiny, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny / "transformer", folder)
    state = dict(weights.iter_tensors(weights.weight_files(folder, STEM)))
    state["proj_out.bias"] = state["proj_out.bias"].to(torch.int32)
    save_file(state, folder / f"{STEM}.safetensors")
    with pytest.raises(
        weights.CheckpointError, match="proj_out.bias: checkpoint holds int32 numbers where the model"
    ):
        mmdit.load(folder)


def test_nan_weights_are_named_and_the_check_can_be_switched_off(tiny, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny / "transformer", folder)
    state = dict(weights.iter_tensors(weights.weight_files(folder, STEM)))
    state["transformer_blocks.1.attn.to_k.weight"][3, 4] = float("nan")
    state["img_in.bias"][0] = float("inf")
    save_file(state, folder / f"{STEM}.safetensors")
    with pytest.raises(
        weights.CheckpointError,
        match=r"tensor '(img_in.bias|transformer_blocks.1.attn.to_k.weight)' "
        r"holds 1 NaN or Inf value",
    ):
        mmdit.load(folder)
    assert torch.isnan(mmdit.load(folder, check_finite=False).transformer_blocks[1].attn.to_k.weight).any()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_layers", 1_000_000, "says num_layers=1000000 but the weights hold 2 transformer_blocks"),
        ("num_layers", "2", "num_layers='2' is not a valid int"),
        ("num_layers", True, "num_layers=True is not a valid int"),
        ("attention_head_dim", 2.5, "attention_head_dim=2.5 is not a valid int"),
        ("num_attention_heads", -2, "num_attention_heads=-2 is not a valid int"),
        ("axes_dims_rope", [8, "12", 12], "axes_dims_rope=\\[8, '12', 12\\] is not a valid"),
        ("axes_dims_rope", [16, 16], "axes_dims_rope=\\[16, 16\\] is not a valid"),  # three axes, not two
        ("zero_cond_t", "yes", "zero_cond_t='yes' is not a valid bool"),
    ],
)
def test_config_fields_are_checked_before_anything_is_built(tiny, tmp_path, field, value, message):
    folder = tmp_path / "t"
    shutil.copytree(tiny / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    start = time.perf_counter()
    with pytest.raises(weights.CheckpointError, match=message):
        mmdit.load(folder)
    assert time.perf_counter() - start < 5  # a million layers is refused, not built


def test_weights_that_overflow_the_requested_dtype_are_told_apart_from_damage(tiny, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny / "transformer", folder)
    state = dict(weights.iter_tensors(weights.weight_files(folder, STEM)))
    state["img_in.bias"][0] = 1e6  # fine in fp32, beyond fp16's 65504
    save_file(state, folder / f"{STEM}.safetensors")
    with pytest.raises(
        weights.CheckpointError,
        match=r"'img_in.bias' has values beyond the range of torch.float16 "
        r"\(largest \|value\| 1e\+06\); load it in bf16 or fp32",
    ):
        mmdit.load(folder, dtype=torch.float16)
    assert mmdit.load(folder, dtype=torch.bfloat16).img_in.bias[0] == 1e6


def test_converted_folders_get_ordinary_permissions(tiny, tmp_path):
    weights_convert.convert(tiny / "transformer", tmp_path / "t", log=lambda *a: None)
    expected = 0o777 & ~writing.current_umask()
    assert (tmp_path / "t").stat().st_mode & 0o777 == expected
    assert (tmp_path / "t" / "config.json").stat().st_mode & 0o777 == expected & 0o666


def test_a_vae_config_with_non_finite_statistics(tiny, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(tiny / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["latents_std"][3] = float("nan")  # Python's json writes and reads NaN
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError, match="latents_std=.* is not a valid"):
        vae.load(folder)


def test_model_index_naming_another_pipeline_is_refused(tiny, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny, root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(
        weights.CheckpointError, match="names the pipeline class 'FluxPipeline': not a Qwen-Image"
    ):
        pipeline.QwenImagePipeline.from_pretrained(root)
    (root / "model_index.json").write_text("{nope")
    with pytest.raises(weights.CheckpointError, match="model_index.json: not valid JSON"):
        pipeline.QwenImagePipeline.from_pretrained(root)


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "merges.txt",
            "#version: 0.2\na b c d\n",
            r"merges.txt \(with its vocab.json\) cannot be read as a tokenizer",
        ),
        ("vocab.json", "{not json", "vocab.json: not valid JSON"),
        (
            "tokenizer_config.json",
            "[1, 2]",
            "added tokens in tokenizer_config.json / added_tokens.json are malformed",
        ),
    ],
)
def test_tokenizer_files_that_do_not_parse_are_named(tmp_path, name, content, message):
    folder = sizes.write_tokenizer_folder(tmp_path / "tokenizer")
    (folder / name).write_text(content)
    with pytest.raises(weights.CheckpointError, match=message):
        tokenizer.load(folder)


# ---------------------------------------------------------------------------------------------
# Numbers: refused up front
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny):
    return pipeline.QwenImagePipeline.from_pretrained(tiny)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(true_cfg_scale=float("nan")), "true_cfg_scale must be a finite number >= 0"),
        (dict(true_cfg_scale=float("inf")), "true_cfg_scale must be a finite number >= 0"),
        (dict(true_cfg_scale=-2.0), "true_cfg_scale must be a finite number >= 0"),
        (dict(sigmas=[0.5, 0.7, 0.2]), "sigmas must decrease strictly"),
        (dict(sigmas=[1.0, float("nan")]), "sigmas must be a non-empty 1-D sequence of values in \\(0, 1\\]"),
        (dict(height=100_000), "height must be at most 16384 pixels"),
        (dict(num_inference_steps=10**6), "num_inference_steps must be at most 1000"),
    ],
)
def test_numbers_are_refused_before_any_work(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before checking"))
    args = dict(
        prompt="a cat", negative_prompt=" ", height=64, width=64, num_inference_steps=2, progress=False
    )
    with pytest.raises(ValueError, match=message):
        pipe(**{**args, **kwargs})


# ---------------------------------------------------------------------------------------------
# The command line: everything checked before a model loads, every failure one line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "OUTDIR"], "is a folder: give a file name"),
        (["--out", "OUTDIR/picture"], "the extension '\\(none\\)' names no image format"),
        (["--out", "OUTDIR/picture.xyz"], "the extension '.xyz' names no image format"),
        (["--out", "OUTDIR/existing.png"], "already exists: pass --overwrite to replace it"),
        (["--out", "OUTDIR/a_file/picture.png"], "a_file is a file, not a folder"),
        (["--steps", "0"], "--steps 0: must be between 1 and 1000"),
        (["--cfg", "nan"], "--cfg nan: must be a finite number >= 0"),
        (["--width", "20000"], "--width 20000: must be between 16 and 16384"),
        (["--device", "gpu0"], "--device gpu0: not a device name"),
    ],
)
def test_generate_checks_everything_before_loading(tmp_path, extra, message):
    """The model folder is empty: any error about the arguments proves they were checked first."""
    (tmp_path / "existing.png").write_bytes(b"old")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_model").mkdir()
    argv = [
        "generate",
        "--model",
        str(tmp_path / "empty_model"),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "new.png"),
    ]
    argv += [a.replace("OUTDIR", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit, match=message) as e:
        cli.main(argv)
    assert "\n" not in str(e.value)
    assert (tmp_path / "existing.png").read_bytes() == b"old"


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A tiny real PNG whose header claims another size: what a decompression bomb looks like to open()."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC
    path.write_bytes(bytes(data))


def test_decompression_bombs_are_refused_with_a_configurable_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_claiming_size(bomb, 40_000, 40_000)
    with pytest.raises(
        ValueError,
        match=r"bomb.png is 40000x40000 = 1,600,000,000 pixels, over the limit of "
        r"89,478,485 \(a decompression bomb\?\)",
    ):
        images.open_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48)).save(small)
    with pytest.raises(ValueError, match="over the limit of 1,000"):
        images.open_image(small, max_pixels=1000)
    assert images.open_image(small, max_pixels=None).size == (64, 48)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = images.open_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 60)
    assert upright.getpixel((10, 2))[0] > 200  # the left band is now at the top


def test_high_bit_depth_images_keep_their_range(tmp_path):
    """Before: 16-bit and float images were clipped by PIL's convert("RGB"): mid-grey became white."""
    grey16 = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    for image in (images.open_image(tmp_path / "g16.png"), grey16, Image.fromarray(grey16.astype(np.int32))):
        assert np.asarray(images.to_rgb(image)).max() == 128
    half = Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32))
    assert np.asarray(images.to_rgb(half)).max() == 64
    with pytest.raises(ValueError, match=r"image: a 'F' image with values in \[0, 1000\]"):
        images.to_rgb(Image.fromarray(np.linspace(0, 1000, 64, dtype=np.float32).reshape(8, 8)))


def test_animated_images_use_the_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="anim.gif is animated \\(2 frames\\): only the first frame is used"):
        first = images.open_image(tmp_path / "anim.gif")
    assert images.to_rgb(first).getpixel((8, 8))[0] > 200


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_the_demo_rounds_odd_sizes(tmp_path):
    with pytest.warns(UserWarning, match="264x200 is rounded down to 256x192"):
        cli.main(
            [
                "demo",
                "--random",
                "--out",
                str(tmp_path / "d.png"),
                "--steps",
                "1",
                "--height",
                "264",
                "--width",
                "200",
            ]
        )
    assert Image.open(tmp_path / "d.png").size == (192, 256)


def test_the_demo_takes_a_model_or_random_not_both(tmp_path):
    with pytest.raises(SystemExit, match="--model and --random exclude each other"):
        cli.main(["demo", "--random", "--model", str(tmp_path), "--out", str(tmp_path / "d.png")])


def test_edit_encode_prompt_takes_image_positions_by_name(tmp_path):
    root = sizes.write_checkpoint(tmp_path / "edit", "tiny", "QwenImageEditPlusPipeline")
    edit = pipeline.QwenImageEditPipeline.from_pretrained(root)
    picture = sizes.test_picture(64, 48)
    with pytest.raises(
        ValueError,
        match=r"max_sequence_length must be None or in 1..1024, got 'sequential' "
        r"\(image_positions is passed by name\)",
    ):
        edit.encode_prompt("x", picture, 1, "sequential")
    with pytest.raises(
        ValueError, match=r"text-to-image takes no input image, got 2 \(pass num_images_per_prompt"
    ):
        pipeline.QwenImagePipeline.encode_prompt(edit, "x", 2)


def test_invalid_unicode_and_the_number_of_kept_tokens(pipe):
    with pytest.raises(
        ValueError, match=r"prompt 1 is not valid Unicode: character 3 \('\\ud83d'\) cannot be encoded"
    ):
        pipe.encode_prompt(["fine", "cat\ud83d dog"])
    long = " ".join(["word"] * 700)
    with pytest.warns(
        UserWarning, match=r"prompt 0 is 70\d tokens long with the template; only the first 512 are used"
    ):
        embeds, _ = pipe.encode_prompt([long], max_sequence_length=512)
    assert embeds.shape[1] == 512
