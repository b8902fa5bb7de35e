import logging

import pytest
from diffusers import EulerDiscreteScheduler, LCMScheduler

from lcm.cli import _lora_arg
from lcm.sampling import auto_device_dtype, generate, lcm_scheduler_for, load_pipeline_for_sampling, parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("7") == [7]
    for bad in ("5-2", ""):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_lora_arg_weight_suffix():
    assert _lora_arg("runs/a") == ("runs/a", 1.0)
    assert _lora_arg("runs/a:0.8") == ("runs/a", 0.8)
    assert _lora_arg("C:/x/lora") == ("C:/x/lora", 1.0)


def test_lcm_scheduler_from_teacher_config_keeps_betas_and_drops_foreign_keys():
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction")
    sched = lcm_scheduler_for(euler.config, original_inference_steps=25)
    assert isinstance(sched, LCMScheduler)
    assert sched.config.original_inference_steps == 25 and sched.config.clip_sample is False
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_end == 0.012
    assert "use_karras_sigmas" not in sched.config


def test_cpu_default_is_fp32():
    import torch

    assert auto_device_dtype("cpu") == ("cpu", torch.float32)
    assert auto_device_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        auto_device_dtype("cpu", "int8")


def test_images_do_not_depend_on_batching_and_negative_prompt_warns(tiny_sdxl_dir, caplog):
    import numpy as np

    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), device="cpu")
    assert isinstance(pipe.scheduler, LCMScheduler)
    together = generate(pipe, ["a red circle"], [3, 4], steps=2, height=16, width=16, batch_size=2)
    alone = generate(pipe, ["a red circle"], [4], steps=2, height=16, width=16, batch_size=1)
    assert np.array_equal(np.asarray(together[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))
    with caplog.at_level(logging.WARNING, logger="lcm"):
        generate(pipe, ["a"], [0], steps=1, guidance_scale=1.0, height=16, width=16, negative_prompt="blurry")
    assert any("negative prompt has no effect" in r.getMessage() for r in caplog.records)


def test_missing_lora_is_a_clear_error(tiny_sdxl_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(tmp_path), 1.0)], device="cpu")
