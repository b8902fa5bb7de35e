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
                                           ("distill.loss_weighting=snr", "distill.loss_weighting"),
                                           ("train.mixed_precision=fp8", "train.mixed_precision"),
                                           ("lora.rank=0", "lora.rank")])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, REQ + [override])


@pytest.mark.parametrize("objective", ["add", "lightning"])
def test_top_index_share_is_refused_where_there_is_no_grid(objective):
    with pytest.raises(ConfigError, match=r"distill\.top_index_share=0\.3.*" + objective):
        load_config(None, REQ + [f"distill.objective={objective}", "distill.top_index_share=0.3"])
    for ok in ("lcd", "tcd_adv", "pcm"):  # the grid objectives take it
        assert load_config(None, REQ + [f"distill.objective={ok}", "distill.top_index_share=0.3"]
                           ).distill.top_index_share == 0.3
    with pytest.raises(ConfigError, match=r"distill\.top_index_share"):
        load_config(None, REQ + ["distill.top_index_share=1.0"])


@pytest.mark.parametrize("objective", ["lcd", "pcm", "tcd", "add", "lightning", "lcd_adv", "pcm_adv", "tcd_adv"])
def test_self_input_share_is_taken_only_by_the_plain_consistency_objectives(objective):
    overrides = REQ + [f"distill.objective={objective}", "distill.self_input_share=0.5"]
    if objective in ("lcd", "pcm", "tcd"):
        assert load_config(None, overrides).distill.self_input_share == 0.5
    else:
        with pytest.raises(ConfigError, match=r"distill\.self_input_share=0\.5.*" + objective):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"distill\.self_input_share"):
        load_config(None, REQ + ["distill.self_input_share=1.0"])


@pytest.mark.parametrize("objective", ["lcd", "pcm", "tcd", "add", "lightning", "lcd_adv", "pcm_adv", "tcd_adv"])
def test_student_t_max_is_taken_only_by_the_objectives_with_a_term(objective):
    """adversarial.student_t_max restricts the *_adv term: every other objective refuses it, naming the key (a plain
    lcd / pcm / tcd run once accepted it silently and it did nothing)."""
    args = REQ + [f"distill.objective={objective}", "adversarial.student_t_max=500"]
    if objective.endswith("_adv"):
        assert load_config(None, args).adversarial.student_t_max == 500
    else:
        with pytest.raises(ConfigError, match=r"adversarial\.student_t_max=500.*" + objective):
            load_config(None, args)
    # ...and without the key the same objective loads: the refusal is the key's, not the objective's
    load_config(None, REQ + [f"distill.objective={objective}"]
                + ["distill.stages=[2,1]", "validation.num_inference_steps=1"] * (objective == "lightning"))


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
        cfg = load_config(name, ["data.path=y"], schema=LCMLoraConfig if "lora" in name else LCDConfig)
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


# --- ranges (issue 14 item 2): every numeric key has a declared range, checked at resolve time -------------------

import math  # noqa: E402
import typing  # noqa: E402
from dataclasses import fields, is_dataclass  # noqa: E402

from lcm.config import Range, declared_ranges  # noqa: E402

SCHEMAS = {"lora": LCMLoraConfig, "lcd": LCDConfig}


def _numeric_keys(schema, prefix=""):
    """Every int/float field (also Optional[...] and list[...] of them), found from the type hints alone."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        t = hints[f.name]
        if is_dataclass(t):
            yield from _numeric_keys(t, f"{prefix}{f.name}.")
            continue
        args = set(typing.get_args(t)) - {type(None)} or {t}
        if args & {int, float}:
            yield prefix + f.name


def _outside(rng: Range, like):
    """A value just outside `rng`, of the field's type (a float field accepts an int-valued float)."""
    if math.isfinite(rng.lo):
        return rng.lo if rng.lo_open else rng.lo - 1
    if math.isfinite(rng.hi):
        return rng.hi if rng.hi_open else rng.hi + 1
    return float("nan") if isinstance(like, float) else None  # unbounded: only non-finite values are refused


def _inside(rng: Range):
    lo = rng.lo if math.isfinite(rng.lo) else (rng.hi - 1 if math.isfinite(rng.hi) else 0)
    return lo + 0.5 if rng.lo_open else lo


def _override(key, value, schema):
    """`key=value` as a command line override; list fields (validation.seeds) take a one-element list."""
    default = load_config(None, REQ, schema=schema)
    from omegaconf import OmegaConf

    current = OmegaConf.select(default, key)
    if OmegaConf.is_list(current):
        return f"{key}=[{value}]", current
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{key}={value}", current


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_every_numeric_key_declares_a_range(schema):
    assert set(_numeric_keys(schema)) == set(declared_ranges(schema))


CASES = [(name, key) for name, schema in SCHEMAS.items() for key in declared_ranges(schema)]


@pytest.mark.parametrize("name, key", CASES, ids=[f"{n}:{k}" for n, k in CASES])
def test_out_of_range_value_names_key_value_and_range(name, key):
    schema = SCHEMAS[name]
    rng = declared_ranges(schema)[key]
    item, current = _override(key, "0", schema)
    value = _outside(rng, current[0] if hasattr(current, "__len__") else current)
    item, _ = _override(key, value, schema)
    with pytest.raises(ConfigError) as err:
        load_config(None, REQ + [item], schema=schema)
    message = str(err.value)
    assert message.startswith(f"{key}=") and "out of range" in message and str(rng) in message, message


@pytest.mark.parametrize("name, key", CASES, ids=[f"{n}:{k}" for n, k in CASES])
def test_in_range_boundary_value_is_accepted(name, key):
    schema = SCHEMAS[name]
    rng = declared_ranges(schema)[key]
    item, _ = _override(key, _inside(rng), schema)
    load_config(None, REQ + [item, *COMPANIONS.get(key, [])], schema=schema)


# Boundary values that a cross-field check would otherwise refuse: the other key moves with them.
COMPANIONS = {"distill.w_max": ["distill.w_min=0"], "distill.num_ddim_timesteps": ["validation.num_inference_steps=1"],
              "adversarial.student_t_max": ["distill.objective=lcd_adv"]}


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr=-0.001 is out of range: must be > 0"),
    ("optim.lr=0", "optim.lr=0.0 is out of range: must be > 0"),
    ("lora.dropout=1.5", "lora.dropout=1.5 is out of range: must be in [0, 1)"),
    ("lora.alpha=0", "lora.alpha=0.0 is out of range: must be > 0"),
    ("distill.num_ddim_timesteps=0", "distill.num_ddim_timesteps=0 is out of range: must be in [1, 1000]"),
    ("validation.num_inference_steps=0", "validation.num_inference_steps=0 is out of range: must be >= 1"),
    ("distill.huber_c=-1", "distill.huber_c=-1.0 is out of range: must be > 0"),
    ("optim.lr_warmup_steps=-1", "optim.lr_warmup_steps=-1 is out of range: must be >= 0"),
    ("validation.num_inference_steps=51", "validation.num_inference_steps=51 must be <= distill.num_ddim_timesteps=50"),
    ("distill.w_min=9", "distill.w_min=9.0 must be <= distill.w_max=8.0"),
])
def test_issue_cases_fail_at_resolve_time(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, REQ + ["distill.w_max=8", override])
    assert str(err.value) == message


def test_validation_needs_prompts_and_seeds_unless_off():
    with pytest.raises(ConfigError, match=r"validation\.every_n_steps=500 needs validation\.prompts"):
        load_config(None, REQ + ["validation.prompts=[]"])
    load_config(None, REQ + ["validation.prompts=[]", "validation.every_n_steps=0"])


def test_range_error_comes_before_any_model_load(tmp_path):
    """optim.lr=-1e-3 used to fail inside torch after the teacher loaded; now train_lcm_lora.py stops at the config
    (model.pretrained does not even exist here)."""
    from _helpers import load_entry_script

    main = load_entry_script("train_lcm_lora").main
    with pytest.raises(ConfigError, match=r"optim\.lr=-0\.001"):
        main(["--config", "demo_lcm_lora", f"model.pretrained={tmp_path / 'nothing'}", f"data.path={tmp_path}",
              "optim.lr=-1e-3"])
