from pathlib import Path

import pytest

from lcm.config import ConfigError, LCDConfig, LCMLoraConfig, load_config, resolve_preset

REQ = ["model.pretrained=x", "data.path=y"]


def test_defaults_and_overrides_typed():
    cfg = load_config(None, REQ + ["lora.rank=8", "optim.lr=3e-4", "validation.seeds=[1,2]"])
    assert cfg.lora.rank == 8 and cfg.optim.lr == 3e-4 and list(cfg.validation.seeds) == [1, 2]


@pytest.mark.parametrize("override, key", [("train.bogus=1", "train.bogus"), ("bogus.x=1", "bogus"),
                                           ("train.batch_size=abc", "train.batch_size"),
                                           ("distill.solver=rk45", "distill.solver"),
                                           ("train.mixed_precision=fp8", "train.mixed_precision"),
                                           ("lora.rank=0", "lora.rank")])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, REQ + [override])


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["model.pretrained=x"])


def test_yaml11_words_stay_strings_and_bools_still_parse():
    cfg = load_config(None, REQ + ["train.mixed_precision=no", "data.center_crop=no", "data.random_flip=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.data.center_crop is False and cfg.data.random_flip is True


def test_presets_resolve_and_load(tmp_path):
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {"lcm_lora_pixart", "lcd_pixart", "lcd_sd21", "lcd_ssd1b", "mini_lcd"} <= set(names)
    for name in names:  # every shipped preset validates against its script's schema
        cfg = load_config(name, ["data.path=y"], schema=LCDConfig if "lcd" in name else LCMLoraConfig)
        assert cfg.model.kind in ("sdxl", "sd15", "pixart")
    with pytest.raises(ConfigError, match="presets"):
        resolve_preset("no_such_preset")
    f = tmp_path / "mine.yaml"
    f.write_text("model: {pretrained: p}\ndata: {path: d}\ntrain: {max_train_steps: 7}\n")
    assert load_config(str(f)).train.max_train_steps == 7


def test_lora_keys_are_not_part_of_full_lcd_schema():
    with pytest.raises(ConfigError, match="lora"):
        load_config(None, REQ + ["lora.rank=4"], schema=LCDConfig)
    assert load_config(None, REQ, schema=LCMLoraConfig).distill.ema_decay == 0.0
    assert load_config(None, REQ, schema=LCDConfig).distill.ema_decay == 0.95
