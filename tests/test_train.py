"""train.py's step against the diffusers recipe (examples/dreambooth/train_dreambooth_lora_qwen_image.py,
diffusers main of 2026-08, lines 1700-1820), fp32 on CPU, same weights and draws.

The script is one `main()` and cannot be imported, so `reference_loss` below transcribes its step line by
line (only the names of the inputs changed), calling diffusers' and PEFT's real objects:
FlowMatchEulerDiscreteScheduler.from_pretrained(..., shift=3.0), compute_density_for_timestep_sampling,
compute_loss_weighting_for_sd3, QwenImagePipeline._pack_latents / _unpack_latents, and a
QwenImageTransformer2DModel with `add_adapter(LoraConfig(...))` as the script configures it."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig

from conftest import max_rel_err, randomize_
from qwenimage_minimal import lora, mmdit, scheduler, train, train_config

TOL = 1e-5
TINY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=3,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
)
OFFICIAL_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)
RANK, ALPHA = 4, 8
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's default lora_layers


def make_models(tmp_path, zero_cond_t=False, lora_=True, seed=0):
    """diffusers' transformer (random weights, + the script's PEFT adapter with B made non-zero so A's
    gradient is not trivially 0) and ours loaded from its folder, with the same adapter copied in."""
    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**TINY, zero_cond_t=zero_cond_t)
    randomize_(ref, seed=seed)
    folder = tmp_path / f"dit{seed}{zero_cond_t}"
    ref.save_pretrained(folder, max_shard_size="200KB")
    ours = mmdit.load(folder)
    if lora_:
        ref.requires_grad_(False)
        ref.add_adapter(
            LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                lora_dropout=0.0,
                init_lora_weights="gaussian",
                target_modules=TARGETS,
            )
        )
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        ours.requires_grad_(False)
        lora.add_adapter(ours, "default", "diffusers", RANK, ALPHA)
        ref_state = dict(ref.named_parameters())
        with torch.no_grad():
            for name, p in lora.trainable_parameters(ours).items():
                p.copy_(ref_state[name])  # same names as PEFT's
        assert len(lora.trainable_parameters(ours)) == sum("lora_" in n for n in ref_state) == 4 * 2 * 3
    ref.train()
    ours.train()
    return ref, ours


def batch(seed=3, n=2, h=8, w=12, text=(7, 5), padded=True):
    """Latents as the script holds them (B, C, 1, h, w), normalised; noise; prompt embeddings with a mask."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 16, 1, h, w, generator=g)
    noise = torch.randn(n, 16, 1, h, w, generator=g)
    L = max(text)
    embeds = torch.randn(n, L, TINY["joint_attention_dim"], generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    for i, length in enumerate(text):
        mask[i, length:] = 0
        embeds[i, length:] = 0
    return x0, noise, embeds, (mask if padded and not mask.all() else None)


def reference_scheduler():
    return FlowMatchEulerDiscreteScheduler.from_config(OFFICIAL_SCHEDULER, shift=3.0)


def reference_loss(
    transformer,
    model_input,
    noise,
    u,
    prompt_embeds,
    prompt_embeds_mask,
    weighting_scheme,
    with_prior_preservation=False,
    prior_loss_weight=1.0,
    image_latents=None,
    image_shapes=(),
):
    """The script's step, from `indices = ...` to `loss = loss + prior_loss_weight * prior_loss`. For Edit,
    the transformer is called as QwenImageEditPipeline calls it (latents, then the image latents)."""
    noise_scheduler_copy = reference_scheduler()

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    bsz = model_input.shape[0]
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    latent_height, latent_width = model_input.shape[3], model_input.shape[4]
    img_shapes = [(1, latent_height // 2, latent_width // 2)] * bsz
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    packed_noisy_model_input = QwenImagePipeline._pack_latents(
        noisy_model_input,
        batch_size=model_input.shape[0],
        num_channels_latents=model_input.shape[1],
        height=model_input.shape[3],
        width=model_input.shape[4],
    )
    if image_latents is not None:  # QwenImageEditPipeline's call
        n = packed_noisy_model_input.shape[1]
        packed_noisy_model_input = torch.cat([packed_noisy_model_input, image_latents], dim=1)
        img_shapes = [[(1, latent_height // 2, latent_width // 2), *image_shapes]] * bsz
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_mask=prompt_embeds_mask,
        timestep=timesteps / 1000,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    if image_latents is not None:
        model_pred = model_pred[:, :n]
    model_pred = QwenImagePipeline._unpack_latents(model_pred, latent_height * 8, latent_width * 8, 8)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    if with_prior_preservation:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean(
            (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
                target_prior.shape[0], -1
            ),
            1,
        )
        prior_loss = prior_loss.mean()
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    )
    loss = loss.mean()
    if with_prior_preservation:
        loss = loss + prior_loss_weight * prior_loss
    return loss


def our_loss(model, x0, noise, u, embeds, mask, scheme, prior=None, reference=None, reference_shapes=()):
    schedule = scheduler.training_schedule(scheduler.SchedulerConfig(**OFFICIAL_SCHEDULER))
    return train.flow_matching_loss(
        model,
        x0[:, :, 0],
        noise[:, :, 0],
        u,
        embeds,
        mask,
        schedule,
        scheme,
        reference=reference,
        reference_shapes=reference_shapes,
        prior_loss_weight=prior,
    )


def grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.clone() for n in names}


def draw_u(scheme, n, seed):
    return compute_density_for_timestep_sampling(
        scheme,
        n,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", train_config.WEIGHTING_SCHEMES)
def test_density_and_weighting_equal_diffusers(scheme):
    for seed in range(3):
        ours = train.timestep_density(
            scheme, 4096, 0.3, 1.2, 1.29, generator=torch.Generator().manual_seed(seed)
        )
        ref = compute_density_for_timestep_sampling(
            scheme,
            4096,
            logit_mean=0.3,
            logit_std=1.2,
            mode_scale=1.29,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(ours, ref)
    sigmas = torch.linspace(0.001, 1, 1000)
    torch.testing.assert_close(
        train.loss_weighting(scheme, sigmas),
        compute_loss_weighting_for_sd3(scheme, sigmas).float(),
        rtol=1e-6,
        atol=0,
    )
    # The schemes differ from each other where they should: the densities put their mass in different places.
    u = train.timestep_density(scheme, 20000, generator=torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() <= 1
    middle = ((u > 0.25) & (u < 0.75)).float().mean().item()
    assert abs(middle - probability_of_the_middle(scheme)) < 0.015, (scheme, middle)


def probability_of_the_middle(scheme):
    """P(0.25 < u < 0.75) in closed form: logit-normal N(0, 1): P(|z| < ln 3); mode (SD3 eq. 20,
    f(v) = 1 - v - s (cos²(pi v / 2) - 1 + v), decreasing for s = 1.29): |f^-1(0.25) - f^-1(0.75)|."""
    if scheme == "logit_normal":
        return math.erf(math.log(3) / math.sqrt(2))
    if scheme != "mode":
        return 0.5

    def f(v):
        return 1 - v - 1.29 * (math.cos(math.pi * v / 2) ** 2 - 1 + v)

    def inverse(y, lo=0.0, hi=1.0):
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > y else (lo, mid)
        return lo

    return inverse(0.25) - inverse(0.75)


def test_mode_density_at_its_edge_does_not_index_past_the_schedule():
    schedule = scheduler.training_schedule(scheduler.SchedulerConfig())
    t, s = train.pick_timesteps(torch.tensor([1.0, 0.0, 0.9999]), schedule)
    assert t.tolist() == [1.0, 1000.0, 1.0] and s[0].item() == pytest.approx(0.001)


@pytest.mark.parametrize("scheme", train_config.WEIGHTING_SCHEMES)
def test_lora_step_loss_and_gradients_match_the_recipe(tmp_path, scheme):
    ref, ours = make_models(tmp_path)
    x0, noise, embeds, mask = batch()
    assert mask is not None  # a padded text batch
    u = draw_u(scheme, 2, seed=5)
    loss_ref = reference_loss(ref, x0, noise, u, embeds, mask, scheme)
    loss_ours = our_loss(ours, x0, noise, u, embeds, mask, scheme)
    assert abs(loss_ours.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
    loss_ref.backward()
    loss_ours.backward()
    names = list(lora.trainable_parameters(ours))
    ref_grads, our_grads = grads(ref, names), grads(ours, names)
    for n in names:
        assert our_grads[n].abs().max() > 0, n
        assert max_rel_err(our_grads[n], ref_grads[n]) <= TOL, n


def test_lora_prior_preservation_matches_the_recipe(tmp_path):
    ref, ours = make_models(tmp_path)
    x0, noise, embeds, mask = batch(n=4, text=(7, 5, 6, 6))
    u = draw_u("logit_normal", 4, seed=6)
    loss_ref = reference_loss(
        ref, x0, noise, u, embeds, mask, "none", with_prior_preservation=True, prior_loss_weight=0.5
    )
    loss_ours = our_loss(ours, x0, noise, u, embeds, mask, "none", prior=0.5)
    assert abs(loss_ours.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
    # and the weight matters: a different prior weight gives a different loss
    assert abs(our_loss(ours, x0, noise, u, embeds, mask, "none", prior=1.0).item() - loss_ours.item()) > 1e-3
    loss_ref.backward()
    loss_ours.backward()
    names = list(lora.trainable_parameters(ours))
    for n, g in grads(ours, names).items():
        assert max_rel_err(g, dict(ref.named_parameters())[n].grad) <= TOL, n


def test_three_adamw_steps_give_the_same_lora_weights(tmp_path):
    ref, ours = make_models(tmp_path)
    names = list(lora.trainable_parameters(ours))
    ref_params = dict(ref.named_parameters())
    settings = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    opt_ref = torch.optim.AdamW([ref_params[n] for n in names], **settings)
    opt_ours = torch.optim.AdamW(list(lora.trainable_parameters(ours).values()), **settings)
    for step in range(3):
        x0, noise, embeds, mask = batch(seed=10 + step)
        u = draw_u("none", 2, seed=20 + step)
        for model, opt, fn in ((ref, opt_ref, reference_loss), (ours, opt_ours, None)):
            opt.zero_grad()
            loss = (
                reference_loss(ref, x0, noise, u, embeds, mask, "none")
                if fn
                else our_loss(ours, x0, noise, u, embeds, mask, "none")
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
    ours_now = lora.trainable_parameters(ours)
    moved = max((ours_now[n] - ref_params[n]).abs().max().item() for n in names)
    for n in names:
        assert max_rel_err(ours_now[n].detach(), ref_params[n].detach()) <= TOL, n
    assert moved < 1e-6
    start = make_models(tmp_path / "again")[1]
    assert max((ours_now[n] - lora.trainable_parameters(start)[n]).abs().max().item() for n in names) > 1e-4


def test_full_finetuning_gradients_match(tmp_path):
    ref, ours = make_models(tmp_path, lora_=False)
    x0, noise, embeds, mask = batch()
    u = draw_u("logit_normal", 2, seed=7)
    reference_loss(ref, x0, noise, u, embeds, mask, "cosmap").backward()
    our_loss(ours, x0, noise, u, embeds, mask, "cosmap").backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for n, p in ours.named_parameters():
        if n.startswith(
            ("transformer_blocks.0.", "transformer_blocks.2.img", "img_in", "proj_out", "time_text")
        ):
            if ref_params[n].grad is None:
                assert p.grad is None or p.grad.abs().max() == 0, n
                continue
            assert max_rel_err(p.grad, ref_params[n].grad) <= TOL, n
            checked += 1
    assert checked > 30


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
def test_edit_step_matches_the_reference_transformer_called_as_the_edit_pipeline(tmp_path, zero_cond_t):
    ref, ours = make_models(tmp_path, zero_cond_t=zero_cond_t)
    x0, noise, embeds, mask = batch()
    g = torch.Generator().manual_seed(9)
    shapes = [(1, 3, 5), (1, 4, 4)]  # two condition images
    image_latents = torch.randn(2, 15 + 16, 64, generator=g)
    u = draw_u("none", 2, seed=8)
    loss_ref = reference_loss(
        ref, x0, noise, u, embeds, mask, "none", image_latents=image_latents, image_shapes=shapes
    )
    loss_ours = our_loss(
        ours, x0, noise, u, embeds, mask, "none", reference=image_latents, reference_shapes=shapes
    )
    assert abs(loss_ours.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
    loss_ref.backward()
    loss_ours.backward()
    for n, gr in grads(ours, list(lora.trainable_parameters(ours))).items():
        assert max_rel_err(gr, dict(ref.named_parameters())[n].grad) <= TOL, n
    # the condition tokens matter (the loss is on the noise tokens only, but they are read)
    other = our_loss(
        ours, x0, noise, u, embeds, mask, "none", reference=image_latents.flip(1), reference_shapes=shapes
    )
    assert abs(other.item() - loss_ours.item()) > 1e-4
