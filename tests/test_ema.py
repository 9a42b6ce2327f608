"""ema.py and train.py --use_ema: the average is diffusers' EMAModel's, it never changes what is trained, and
checkpoints, samples and the result hold it; a run with it resumes exactly."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import squares
from qwenimage_minimal import ema, sizes, train, train_config


def test_the_average_is_diffusers_emamodels():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    weights = {"a": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.nn.Parameter(torch.randn(7))}
    reference = EMAModel(list(weights.values()), decay=0.95)
    average = ema.start(weights)
    for step in range(1, 40):
        with torch.no_grad():
            for p in weights.values():
                p.add_(torch.randn_like(p))
        reference.step(list(weights.values()))
        ema.update(average, weights, step, 0.95)
        assert ema.decay_at(step, 0.95) == pytest.approx(reference.cur_decay_value, abs=1e-12)
    for (name, got), expected in zip(average.items(), reference.shadow_params):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # swapped in for a while, then the weights as trained again
    before = {n: p.detach().clone() for n, p in weights.items()}
    with ema.swapped_in(weights, average):
        assert all(torch.equal(weights[n], average[n]) for n in weights)
    assert all(torch.equal(weights[n], before[n]) for n in weights)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("ema") / "tiny", "tiny")


def config(model, data, out, **overrides):
    settings = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        resolution=64,
        mixed_precision="no",
        train_batch_size=2,
        checkpointing_steps=3,
        max_train_steps=6,
        learning_rate=1e-3,
        use_ema=True,
        ema_decay=0.9,
    )
    settings.update(overrides)
    return train_config.TrainConfig(**settings)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_use_ema_saves_the_average_trains_the_same_and_resumes_exactly(tiny_model, tmp_path, finetune):
    data = squares(tmp_path / "data")
    train.train(config(tiny_model, data, tmp_path / "ema", finetune=finetune), progress=False)
    train.train(
        config(tiny_model, data, tmp_path / "plain", finetune=finetune, use_ema=False), progress=False
    )
    state = load_file(tmp_path / "ema" / "checkpoint-6" / "training_state.safetensors")
    plain = load_file(tmp_path / "plain" / "checkpoint-6" / "training_state.safetensors")
    averaged = {k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")}
    trained = {k[len("param.") :]: v for k, v in state.items() if k.startswith("param.")}
    assert averaged.keys() == trained.keys() and len(averaged) > 4
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)  # an average, not a copy
    # the average never feeds back: the weights as trained and the moments are the plain run's
    for k, v in plain.items():
        assert torch.equal(v, state[k]), k
    if finetune == "full":
        assert all(torch.equal(trained[k], v) for k, v in load_plain_transformer(tmp_path / "plain").items())
        saved = load_plain_transformer(tmp_path / "ema")  # the result is the average
        assert all(torch.equal(saved[k], averaged[k]) for k in averaged)
    else:
        adapter = load_file(tmp_path / "ema" / "lora.safetensors")
        plain_adapter = load_file(tmp_path / "plain" / "lora.safetensors")
        assert adapter.keys() == plain_adapter.keys()
        assert any(not torch.equal(adapter[k], plain_adapter[k]) for k in adapter)
        values = list(averaged.values())  # every tensor of the adapter file is one of the average's
        assert all(any(torch.equal(t, v) for v in values) for t in adapter.values())
    # 3 steps, stop, resume, 3 more == 6 straight, the average included
    train.train(
        config(tiny_model, data, tmp_path / "b", finetune=finetune, max_train_steps=3), progress=False
    )
    train.train(
        config(tiny_model, data, tmp_path / "b", finetune=finetune, resume_from_checkpoint="latest"),
        progress=False,
    )
    resumed = load_file(tmp_path / "b" / "checkpoint-6" / "training_state.safetensors")
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)


def load_plain_transformer(out):
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


def test_a_plain_run_does_not_resume_an_ema_checkpoint_and_the_decay_is_checked(tiny_model, tmp_path):
    data = squares(tmp_path / "data")
    train.train(config(tiny_model, data, tmp_path / "ema", max_train_steps=3), progress=False)
    with pytest.raises(ValueError, match="from another run.*use_ema"):
        train.train(
            config(tiny_model, data, tmp_path / "ema", use_ema=False, resume_from_checkpoint="latest"),
            progress=False,
        )
    with pytest.raises(ValueError, match="--ema_decay"):
        train.train(config(tiny_model, data, tmp_path / "x", ema_decay=1.0), progress=False)
