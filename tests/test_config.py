import pytest

from ucad.config import Config, load_config


def test_paper_preset_is_method_defaults():
    config = load_config()
    assert config == Config()
    assert config.backbone == "vit_base_patch16_224.augreg_in21k" and config.pretrained
    assert (config.feature_layer, config.key_size, config.knowledge_size) == (5, 196, 196)
    assert (config.epochs, config.batch_size, config.lr, config.temperature) == (25, 8, 5e-4, 0.5)
    assert config.structure == "sam" and config.prompt_mode == "prefix"


def test_smoke_preset_needs_no_weights():
    config = load_config("smoke")
    assert not config.pretrained and config.structure == "superpixel"


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.01\n")
    config = load_config("smoke", path, {"lr": 0.02})
    assert (config.epochs, config.lr, config.pretrained) == (3, 0.02, False)
    json_path = tmp_path / "c.json"
    json_path.write_text('{"key_size": 10}')
    assert load_config("paper", json_path).key_size == 10


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        load_config("fast")
    path = tmp_path / "c.yaml"
    path.write_text("epoks: 3\n")
    with pytest.raises(
        ValueError, match=r"c\.yaml\): unknown field 'epoks'; did you mean 'epochs'\?"
    ):
        load_config("paper", path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config("paper", path)
    with pytest.raises(ValueError, match="resize"):
        load_config(overrides={"resize": 100})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config("paper", tmp_path / "missing.yaml")


def test_field_errors_name_the_field_and_the_value():
    with pytest.raises(ValueError, match=r"key_size: .*greater than or equal to 1 \(got -1\)"):
        load_config("smoke", overrides={"key_size": -1})
    with pytest.raises(ValueError, match=r"device: .*\(got 'gpu'\)"):
        load_config("smoke", overrides={"device": "gpu"})
    assert load_config("smoke", overrides={"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match=r"unknown field 'colour'$"):  # nothing close: no guess
        load_config("smoke", overrides={"colour": 1})


def test_digest_fields_are_plain_json():
    assert load_config().digest_fields("epochs", "betas") == {"epochs": 25, "betas": [0.9, 0.999]}
