"""The nano Edit model (issue 25): edit pairs and their scorer (nano/edits.py), the recipe on a minute's data
(nano/edit_recipe.py), and the committed folder (checkpoints/nano_edit): it loads in our
QwenImageEditPlusPipeline and in diffusers' with equal latents, and carries out held-out edits, scored from
pixels."""

import json
import shutil

import pytest
import torch

from conftest import max_rel_err
from qwenimage_minimal import checkpoints, nano, pipeline
from qwenimage_minimal.nano import edit_recipe, edits, scenes

# --- the data and the scorer -------------------------------------------------------------------


def test_the_splits_hold_out_what_they_say_and_every_kind_appears():
    train, held = edits.make_edits(100, seed=1), edits.make_edits(50, seed=1, split="held_out")
    assert not any(edits.is_held_out(e) for e in train)
    assert all(edits.is_held_out(e) for e in held)
    assert {e.kind for e in train} == {e.kind for e in held} == set(edits.KINDS)
    for e in train + held:  # the source is a training-split scene, its colours distinct (names are unique)
        assert not scenes.is_held_out(e.source)
        assert len({t.colour for t in e.target.things}) == len(e.target.things)


def test_the_instructions_follow_the_grammar():
    made = {e.kind: edits.instruction(e) for e in edits.make_edits(5, seed=3)}
    assert made["recolour"].startswith("change the ") and " to " in made["recolour"]
    assert made["move"].startswith("move the ") and " to the " in made["move"]
    assert made["reshape"].startswith("turn the ") and " into a " in made["reshape"]
    assert made["add"].startswith("add a ")
    assert made["remove"].startswith("remove the ")


def test_unnamed_objects_are_drawn_exactly_as_in_the_source():
    for e in edits.make_edits(50, seed=4):
        named = {e.thing, e.changed}
        assert [t for t in e.source.things if t not in named] == [
            t for t in e.target.things if t not in named
        ]
        assert e.target.background == e.source.background


def test_the_scorer_passes_the_targets_and_fails_the_sources_and_wrong_edits():
    """A grader says no: the untouched source carries out no edit; an edit applied to the wrong object, or one
    that also changes an unnamed object, is caught."""
    made = edits.make_edits(100, seed=5)
    right = edits.evaluate([scenes.render(e.target) for e in made], made)
    assert all(row["done"] == 1.0 and row["kept"] == 1.0 for row in right.values()), right
    unchanged = edits.evaluate([scenes.render(e.source) for e in made], made)
    assert all(row["done"] == 0.0 for row in unchanged.values()), unchanged
    two = [e for e in made if e.kind == "recolour" and len(e.source.things) == 2]
    for e in two:  # recolour the other object instead: not done, and an unnamed object changed
        other = next(t for t in e.source.things if t is not e.thing)
        wrong = scenes.Scene(
            tuple(
                scenes.Thing(e.changed.colour, o.shape, o.position, o.size, o.side, o.offset)
                if o is other
                else o
                for o in e.source.things
            ),
            e.source.background,
        )
        assert edits.judge(scenes.render(wrong), e) == {"done": False, "kept": False}


def test_an_unknown_kind_is_an_error_not_a_remove():
    with pytest.raises(ValueError, match="kinds must be"):
        edits.make_edits(5, kinds=("recolor",))
    with pytest.raises(ValueError, match="kinds must be"):
        edits.make_edits(5, kinds="move")


def test_share_with_links_equal_files_of_a_sibling_folder_and_refuses_anything_else(tmp_path):
    base, built = tmp_path / "base", tmp_path / "built"
    for folder, text in ((base, "same"), (built, "same")):
        (folder / "part").mkdir(parents=True)
        (folder / "part" / "a.json").write_text(text)
    (base / "part" / "b.json").write_text("base only")
    (built / "part" / "c.json").write_text("built only")
    assert edit_recipe.share_with(built, base) == ["part/a.json"]
    assert (built / "part" / "a.json").is_symlink() and (built / "part" / "a.json").read_text() == "same"
    assert not (built / "part" / "c.json").is_symlink()
    with pytest.raises(ValueError, match="side by side"):
        edit_recipe.share_with(base, base)
    with pytest.raises(ValueError, match="side by side"):
        edit_recipe.share_with(built / "part", base)


def test_the_recipe_refuses_a_base_inside_its_out_before_removing_anything(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(nano.COMMITTED, out / "model")  # e.g. --out out/nano --base out/nano/model
    (out / ".train-nano").write_text("an earlier run's work folder\n")
    with pytest.raises(ValueError, match="inside --out"):
        edit_recipe.build(edit_recipe.NanoEditConfig(out=str(out), base=str(out / "model")))
    assert (out / "model" / "model_index.json").is_file()
    with pytest.raises(ValueError, match="QwenImageEditPlusPipeline folder"):
        edit_recipe.build(edit_recipe.NanoEditConfig(out=str(tmp_path / "o2"), base=str(nano.COMMITTED_EDIT)))


# --- the recipe, minute-sized ------------------------------------------------------------------


def test_a_minute_of_edit_fine_tuning_lowers_the_loss(tmp_path):
    c = edit_recipe.NanoEditConfig(
        out=str(tmp_path / "edit"), **{**edit_recipe.QUICK_EDIT, "eval_edits": 0, "eval_cfgs": ()}
    )
    report = edit_recipe.build(c)
    losses = [r["loss"] for r in checkpoints.read_log(tmp_path / "edit" / "run" / "log.jsonl")]
    print(report["mmdit"]["loss_first"], report["mmdit"]["loss_last"])
    assert len(losses) == c.steps and report["mmdit"]["loss_last"] < 0.8 * report["mmdit"]["loss_first"]
    model = tmp_path / "edit" / "model"
    defaults = json.loads((model / "pipeline_defaults.json").read_text())
    assert (
        defaults["vae_area"] == defaults["output_area"] == 128 * 128 and defaults["condition_area"] == 96 * 96
    )
    pipe = pipeline.QwenImageEditPipeline.from_pretrained(model)
    assert type(pipe) is pipeline.QwenImageEditPlusPipeline
    assert (pipe.vae_area, pipe.condition_area, pipe.output_area) == (128 * 128, 96 * 96, 128 * 128)


# --- the committed folder ----------------------------------------------------------------------

committed = pytest.mark.skipif(
    not (nano.COMMITTED_EDIT / "model_index.json").is_file(),
    reason="checkpoints/nano_edit is not in this checkout",
)


@pytest.fixture(scope="module")
def nano_edit():
    return pipeline.QwenImageEditPipeline.from_pretrained(nano.COMMITTED_EDIT, dtype=torch.float32)


@committed
def test_the_folder_is_edit_2509_with_its_areas_and_shares_files_with_the_nano_model(nano_edit):
    assert type(nano_edit) is pipeline.QwenImageEditPlusPipeline
    assert (nano_edit.vae_area, nano_edit.condition_area, nano_edit.output_area) == (
        128 * 128,
        96 * 96,
        128 * 128,
    )
    own = [p for p in nano.COMMITTED_EDIT.rglob("*") if p.is_file() and not p.is_symlink()]
    links = [p for p in nano.COMMITTED_EDIT.rglob("*") if p.is_symlink()]
    assert links and all(p.resolve().is_relative_to(nano.COMMITTED.resolve()) for p in links)
    assert sum(p.stat().st_size for p in own) <= 10_000_000  # a few MB beyond the text-to-image model


@committed
def test_diffusers_loads_the_folder_and_edits_to_the_same_latents(nano_edit, monkeypatch):
    """diffusers' QwenImageEditPlusPipeline over the folder's components, each loaded by diffusers' or
    transformers' own class (its areas are module constants: set to the folder's; the processor is the tests'
    stub, as the folder has no tokenizer files in processor/); our prompt embeddings for both (the encoders
    are compared below), the same noise."""
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", nano_edit.vae_area)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", nano_edit.condition_area)
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from test_vision import StubProcessor
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    folder = nano.COMMITTED_EDIT
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "tokenizer")
    reference = QwenImageEditPlusPipeline(  # each component read from the folder by its library's class
        transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval(),
        vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=tokenizer,
        processor=StubProcessor(tokenizer, min_pixels=3136, max_pixels=12845056),
    )
    reference.set_progress_bar_config(disable=True)
    e = edits.make_edits(1, seed=3, split="held_out")[0]
    source = scenes.render(e.source)
    read = nano_edit.image_features(nano_edit.prepare_images(source)[0])
    embeds, mask = nano_edit.encode_prompt(edits.instruction(e), read)
    neg, neg_mask = nano_edit.encode_prompt("", read)
    common = dict(
        image=source,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=2.0,
        height=128,
        width=128,
        num_inference_steps=4,
        output_type="latent",
    )
    expected = reference(generator=torch.Generator().manual_seed(0), **common).images
    got = nano_edit(generator=torch.Generator().manual_seed(0), progress=False, **common).images
    assert got.shape == expected.shape == (1, 64, 16)
    assert max_rel_err(got, expected) <= 1e-5


@committed
def test_transformers_loads_the_text_encoder_with_its_vision_tower(nano_edit):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenimage_minimal import images

    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        nano.COMMITTED_EDIT / "text_encoder", torch_dtype=torch.float32
    ).eval()
    source = scenes.render(edits.make_edits(1, seed=3)[0].source)
    pixels, grid = images.preprocess(nano_edit.prepare_images(source)[0][0], nano_edit.processor_config)
    ids = torch.tensor([[9707, 11, 1879, 0, 1052]])
    with torch.no_grad():
        expected = ref.model.visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
        got = nano_edit.vision_tower(pixels, [grid])
        hidden = ref.model.language_model(input_ids=ids).last_hidden_state
        ours = nano_edit.text_encoder(ids)
    assert grid == (1, 6, 6)  # 84 x 84 px: 6 x 6 patches, 3 x 3 tokens after merging
    assert max_rel_err(got, expected) <= 1e-5
    assert max_rel_err(ours if torch.is_tensor(ours) else ours[0], hidden) <= 1e-5


@committed
def test_the_committed_model_carries_out_held_out_edits(nano_edit):
    """The committed floor on 20 held-out edits (4 of each kind, 20 steps, CFG 2 against ""): measured here 85%
    carried out, 62% with every unnamed object kept; on 500 (checkpoints/nano_edit/README.md) 81% and 69%,
    short of the issue's 90% and 95%. A model that edits nothing scores 0 on `done` (the scorer's test above).
    "Kept" counts the 8 edits that leave an object unnamed, 12.5 points each: its floor, 3 of 8, leaves two edits
    of room below the 5 measured, and still fails a model that loses what it was not told to change."""
    held = edits.make_edits(20, seed=11, split="held_out")
    got = edits.evaluate(edit_recipe.edit_all(nano_edit, held, 2.0, 20), held)
    print({k: (v["done"], round(v["kept"], 2)) for k, v in got.items()})
    assert got["all"]["done"] >= 0.65 and got["all"]["kept"] >= 0.35, got


@committed
def test_demo_edit_runs_the_nano_edit_model_and_scores_each_edit(tmp_path, capsys):
    from qwenimage_minimal import __main__ as cli

    out = tmp_path / "edits.png"
    cli.main(["demo", "--edit", "--out", str(out), "--steps", "8"])
    printed = capsys.readouterr().out
    assert "the NANO Edit model" in printed and printed.count("[held out]") == 5
    assert printed.count("  OK") + printed.count("(scorer:") == 10
    from PIL import Image

    assert Image.open(out).size[0] == 4 * 256  # source | result pairs, two per row, at scale 2
