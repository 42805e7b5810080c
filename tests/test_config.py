import pytest

from fastpixel import ModelConfig


def test_json_round_trip_keeps_every_field():
    cfg = ModelConfig(image_size=(28, 32), channels=1, nr_resnet=2, nr_filters=20, nr_logistic_mix=4,
                      num_classes=10, dropout=0.1, resnet_nonlinearity="elu", coordconv=True, nonlocal_block=True)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.shape == (28, 32)
    assert ModelConfig.from_json(ModelConfig(image_size=28).to_json()).image_size == 28
    assert ModelConfig(image_size=(28, 28)) == ModelConfig(image_size=28)  # one spelling per shape


@pytest.mark.parametrize("field, value, allowed", [
    ("image_size", 30, "divisible by 4"),
    ("image_size", (28, 30), "divisible by 4"),
    ("image_size", (28,), "(height, width)"),
    ("image_size", "28", "(height, width)"),
    ("channels", 2, "1 or 3"),
    ("nr_resnet", 0, "positive"),
    ("nr_filters", -1, "positive"),
    ("nr_logistic_mix", 1.5, "positive"),
    ("num_classes", 1, ">= 2"),
    ("dropout", 1.0, "[0, 1)"),
    ("dropout", -0.1, "[0, 1)"),
    ("resnet_nonlinearity", "gelu", "concat_elu, elu, relu"),
    ("coordconv", 1, "True or False"),
    ("nonlocal_block", "yes", "True or False"),
])
def test_invalid_values_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{field: value})
    assert field in str(err.value) and allowed in str(err.value)


def test_from_json_rejects_unknown_fields_and_bad_json():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"image_size": 28, "colour": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{image_size: 28")
