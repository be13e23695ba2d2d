"""The registry of named configurations: lookup, the public views, and the sizes the docs state."""

import pytest
from diffusers import UNet2DModel

import diffusers_diffit
from diffusers_diffit import DiffiTTransformer2DModel, DiffiTUNet2DModel, model_config
from diffusers_diffit.configs import MODEL_CONFIGS


def test_lookup_returns_the_class_and_a_copy():
    model_class, config = model_config("DiffiT-XL/2-256")
    assert model_class is DiffiTTransformer2DModel and config["sample_size"] == 32 and config["num_layers"] == 28
    config["sample_size"] = 1
    assert model_config("DiffiT-XL/2-256")[1]["sample_size"] == 32


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"`name` 'DiffiT-XL/4' is not .*allowed: \['DiffiT-CIFAR10', .*'tiny-unet'\]"
    ):
        model_config("DiffiT-XL/4")


def test_public_names_are_views_of_the_registry():
    assert set(diffusers_diffit.DIFFIT_CONFIGS) == {"DiffiT-XL/2-256", "DiffiT-XL/2-512"}
    assert set(diffusers_diffit.DIFFIT_UNET_CONFIGS) == {"DiffiT-CIFAR10", "DiffiT-FFHQ64"}
    for name, config in {**diffusers_diffit.DIFFIT_CONFIGS, **diffusers_diffit.DIFFIT_UNET_CONFIGS}.items():
        assert config is MODEL_CONFIGS[name][1]


@pytest.mark.parametrize(
    "name, model_class, parameters",
    [("DiffiT-digits", DiffiTUNet2DModel, 758_453), ("UNet2D-digits", UNet2DModel, 729_569)],
)
def test_digits_models_have_the_documented_sizes(name, model_class, parameters):
    cls, config = model_config(name)
    assert cls is model_class and sum(p.numel() for p in cls(**config).parameters()) == parameters
