"""`python -m qwenimage_minimal demo`: the whole pipeline on the CPU, stage by stage, with shapes and times. By
default the committed nano model draws its demo prompts, scored from pixels; --edit the nano Edit model edits
scenes, scored; --random a tiny random-weight model (noise: the machinery only); --model an official folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import images, nano, pipeline, prompts, sizes
from .cli_options import check_sampling_options, fill_sampling_defaults, resolve_device, resolve_dtype
from .nano import edits, scenes


def demo_pipeline(args, stage, class_name: str):
    """`demo`'s pipeline: the one in --model; the committed nano model; or (--random, --edit) a tiny random one
    written first (CPU, fp32)."""
    if args.model:
        device = resolve_device(args.device)
        root, dtype = Path(args.model), resolve_dtype(None, device)
    elif args.random or class_name != "QwenImagePipeline":
        folder = "tiny-qwen-image" if class_name == "QwenImagePipeline" else "tiny-qwen-image-edit"
        root = sizes.write_checkpoint(args.out.parent / folder, "tiny", class_name)
        stage(
            f"wrote a TINY RANDOM-WEIGHT {class_name} checkpoint (official folder layout) to {root}: "
            "its image is noise"
        )
        device, dtype = torch.device("cpu"), torch.float32
    else:
        root, device, dtype = nano.COMMITTED, torch.device("cpu"), torch.float32
        if not (root / "model_index.json").is_file():
            raise SystemExit(
                f"error: the nano model is not in {root} (a clone of the repository has it; `make nano` "
                "trains it again): or pass --random for a tiny random-weight model"
            )
        stage(
            f"the NANO model from {root}: Qwen-Image's architecture trained from scratch on generated scenes "
            "(nano/recipe.py)"
        )
    cls = pipeline.QwenImagePipeline if class_name == "QwenImagePipeline" else pipeline.QwenImageEditPipeline
    return cls.from_pretrained(root, device=device, dtype=dtype)


def step_printer(stage, sigmas, note: str = ""):
    """A callback_on_step_end that prints each step of the schedule `sigmas`: the noise levels, the latents'
    shape and spread."""
    steps = len(sigmas) - 1

    def on_step(pipe, i, t, tensors):
        latents = tensors["latents"]
        stage(
            f"  step {i + 1}/{steps}: sigma {sigmas[i]:.3f} -> {sigmas[i + 1]:.3f}, "
            f"latents {tuple(latents.shape)}, std {latents.float().std():.3f}{note}"
        )
        return tensors

    return on_step


def demo(args):
    nano_model = not (args.model or args.random or args.edit)
    nano_edit = args.edit and not (args.model or args.random)
    # The nano models' own settings (trained at 128 x 128; the best CFG, against the empty prompt they learnt),
    # from their folders; a toy size for the random models and --model.
    toy = dict(height=256, width=384, num_inference_steps=8, true_cfg_scale=4.0, negative_prompt=" ")
    own = nano.COMMITTED if nano_model else nano.COMMITTED_EDIT if nano_edit else None
    if own is not None and not (own / "model_index.json").is_file():
        raise SystemExit(
            f"error: the nano model is not in {own} (a clone of the repository has it; `make "
            f"{'nano-edit' if nano_edit else 'nano'}` trains it again): or pass --random for a tiny random-weight model"
        )
    fill_sampling_defaults(args, pipeline.read_pipeline_defaults(own) if own else toy)
    check_sampling_options(args, args.overwrite)
    t0 = time.perf_counter()
    stage = lambda text: print(f"[{time.perf_counter() - t0:7.2f}s] {text}", flush=True)
    if nano_edit:
        return demo_nano_edit(args, stage)
    if args.edit:
        args.prompt = args.prompt or "Paint the house blue and put a rainbow in the sky"
        return demo_edit(args, stage)
    if args.prompt:
        prompt_list = [args.prompt]
    elif nano_model:
        prompt_list = list(nano.DEMO_PROMPTS)
    else:
        prompt_list = ['A corgi wearing sunglasses, neon sign that says "Qwen"']
    pipe = demo_pipeline(args, stage, "QwenImagePipeline")
    device, dtype = pipe.device, pipe.transformer.img_in.weight.dtype
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("text_encoder", "transformer", "vae")
    }
    stage(
        "loaded " + ", ".join(f"{k} {v:.1f} M params" for k, v in params.items()) + f" ({dtype} on {device})"
    )

    embeds, mask = pipe.encode_prompt(prompt_list)
    stage(
        f"{len(prompt_list)} prompt(s) -> template -> {pipe.text_encoder.config.num_hidden_layers}-layer Qwen2.5-VL "
        f"-> embeddings {tuple(embeds.shape)} ({prompts.T2I_PREFIX_TOKENS} template tokens dropped, padded to the "
        "longest, masked)"
    )
    height, width = pipe.check_size(args.height, args.width)  # rounded to whole tokens
    s, p, c = pipe.vae_scale_factor, pipe.transformer.config.patch_size, pipe.vae.config.z_dim
    h, w, n = height // s, width // s, len(prompt_list)
    stage(
        f"noise ({n}, {c}, {h}, {w}) -> packed tokens ({n}, {(h // p) * (w // p)}, {c * p * p}); "
        f"{args.steps} Euler steps with true CFG {args.cfg} against negative prompt {args.negative_prompt!r}"
    )

    latents = pipe(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.cfg,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="latent",
        callback_on_step_end=step_printer(stage, pipe.schedule(args.steps, height, width)),
        progress=False,
    ).images
    stage(
        f"latents {tuple(latents.shape)} -> unpacked ({n}, {c}, {h}, {w}) -> * latents_std + latents_mean -> "
        "VAE decoder"
    )
    pictures = pipe.decode(latents, height, width, "pil").images
    if len(pictures) == 1:
        images.save_image(pictures[0], args.out)
        stage(f"image {pictures[0].size[0]}x{pictures[0].size[1]} -> {args.out}")
    labels = list(prompt_list)
    if nano_model:  # the scorer of nano/scenes.py reads each picture back (a nano GenEval)
        for i, (picture, text) in enumerate(zip(pictures, prompt_list)):
            try:
                scene = scenes.parse_caption(text)
            except ValueError:
                continue  # a prompt outside the scene language: not scored
            verdicts = scenes.score(picture, scene)
            marks = "; ".join(
                f"{t.colour} {t.shape}: colour {'ok' if v['colour'] else 'NO'}, shape "
                f"{'ok' if v['shape'] else 'NO'}, position {'ok' if v['position'] else 'NO'}"
                for t, v in zip(scene.things, verdicts)
            )
            held_out = " (held out of training)" if scenes.is_held_out(scene) else ""
            stage(f"  {text!r}{held_out}: {marks}")
            labels[i] = (
                ("[held out] " if held_out else "")
                + text
                + ("  OK" if all(v["correct"] for v in verdicts) else "  (scorer: wrong)")
            )
    if len(pictures) > 1:
        grid = images.picture_grid(pictures, labels, columns=4, scale=2)
        images.save_image(grid, args.out)
        stage(f"{n} images -> a labelled grid {grid.size[0]}x{grid.size[1]} -> {args.out}")


def demo_nano_edit(args, stage):
    """`demo --edit`'s default: the committed nano Edit model (checkpoints/nano_edit) carries out one edit of
    each kind it was trained on and one of each held-out kind (edits.HELD_OUT_KINDS), or --prompt on a scene;
    a grid of source | result pairs, each read back by the scorer (nano/edits.py)."""
    root = nano.COMMITTED_EDIT
    if not (root / "model_index.json").is_file():
        raise SystemExit(
            f"error: the nano Edit model is not in {root} (a clone of the repository has it; `make nano-edit` "
            "trains it again): or pass --random for a tiny random-weight Edit model"
        )
    pipe = pipeline.QwenImageEditPlusPipeline.from_pretrained(root, dtype=torch.float32)
    stage(
        f"the NANO Edit model from {root}: the nano model fine-tuned on generated edits (nano/edit_recipe.py); "
        f"areas: VAE {pipe.vae_area} px, vision tower {pipe.condition_area} px (its pipeline_defaults.json)"
    )
    chosen = edits.make_edits(5, seed=1) + edits.make_edits(5, seed=1, split="held_out")
    if args.prompt:
        chosen = chosen[:1]
    pictures, labels = [], []
    for e in chosen:
        instruction = args.prompt or edits.instruction(e)
        source = scenes.render(e.source)
        result = pipe(
            image=source,
            prompt=instruction,
            negative_prompt=args.negative_prompt,
            true_cfg_scale=args.cfg,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed),
            progress=False,
        ).images[0]
        held_out = "[held out] " if edits.is_held_out(e) else ""
        if args.prompt:
            verdict = ""
        else:
            v = edits.judge(result, e)
            verdict = (
                "  OK"
                if v["done"] and v["kept"]
                else "  (scorer: " + ("not done" if not v["done"] else "an unnamed object changed") + ")"
            )
        stage(f"  {held_out}{instruction!r}: {scenes.caption(e.source.named())} -> edited{verdict}")
        pictures += [source, result]
        labels += [f"{held_out}source", f"{instruction}{verdict}"]
    grid = images.picture_grid(pictures, labels, columns=4, scale=2)
    images.save_image(grid, args.out)
    stage(
        f"{len(chosen)} edits -> a grid of source | result pairs {grid.size[0]}x{grid.size[1]} -> {args.out}"
    )


def demo_edit(args, stage):
    """The Edit-2509 pipeline, stage by stage, on a tiny random model (or --model)."""
    pipe = demo_pipeline(args, stage, "QwenImageEditPlusPipeline")
    if not args.model:  # keep the toy fast: small areas instead of 1024^2 / 384^2
        pipe.output_area = pipe.vae_area = args.height * args.width
        pipe.condition_area = 112 * 112
        stage(f"toy areas: VAE and output {args.width}x{args.height}-ish, vision tower 112x112-ish")
    image = sizes.test_picture()
    images.save_image(image, args.out.with_name("demo_input.png"))
    stage(
        f"{type(pipe).__name__} loaded; input {image.size[0]}x{image.size[1]} -> {args.out.with_name('demo_input.png')}"
    )

    condition, vae_images = pipe.prepare_images(image)
    features, grids = pipe.image_features(condition)
    stage(
        f"vision tower: {condition[0].size[0]}x{condition[0].size[1]} -> patches {grids[0]} (t, h, w) -> "
        f"{tuple(features.shape)} features = {images.image_token_count(grids[0])} <|image_pad|> tokens"
    )
    read = pipeline.ImageFeatures(features, grids)
    embeds, mask = pipe.encode_prompt(args.prompt, read)
    neg_embeds, neg_mask = pipe.encode_prompt(args.negative_prompt, read)
    stage(
        f"'Picture 1: <image>' + prompt -> Qwen2.5-VL with 3-D positions -> embeddings {tuple(embeds.shape)} "
        f"({prompts.EDIT_PREFIX_TOKENS} template tokens dropped; the image tokens stay)"
    )
    tokens, shapes = pipe.encode_image_latents(vae_images)
    stage(
        f"VAE: {vae_images[0].size[0]}x{vae_images[0].size[1]} -> normalised latents -> {tuple(tokens.shape)} "
        f"reference tokens, img_shapes {shapes} (frame 1 in the MMDiT's RoPE)"
    )

    # The pipeline takes the embeddings computed above (the vision tower and the text encoder do not run again);
    # the output size is its default: the input's aspect at `output_area`, in whole tokens.
    width, height = images.calculate_dimensions(pipe.output_area, image.width / image.height)
    height, width = pipe.check_size(height, width)
    out = pipe(
        image=image,
        height=height,
        width=width,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg_embeds,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=args.cfg,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        callback_on_step_end=step_printer(
            stage,
            pipe.schedule(args.steps, height, width),
            f" (+ {tokens.shape[1]} reference tokens in the MMDiT)",
        ),
        progress=False,
    ).images[0]
    images.save_image(out, args.out)
    stage(f"edited image {out.size[0]}x{out.size[1]} -> {args.out}")
