"""The example accelerate configs in configs/accelerate/ load with accelerate's own loader, which rejects unknown
top-level keys; their nested FSDP / DeepSpeed keys must be options `accelerate launch` knows (the loader passes those
through unchecked, so a typo there would be silently ignored)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser

from lcm.config import CHOICES

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp.yaml": "MULTI_GPU", "ddp_multinode.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
            "deepspeed_zero2.yaml": "DEEPSPEED"}


def _launch_options() -> set[str]:
    return {action.dest for action in launch_command_parser()._actions}


def test_every_shipped_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED[name]
    assert config.mixed_precision in CHOICES["train.mixed_precision"]
    assert config.num_processes >= config.num_machines >= 1
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port
    known = _launch_options()
    nested = {f"fsdp_{k}" if not k.startswith("fsdp_") else k for k in config.fsdp_config} | set(config.deepspeed_config)
    assert nested <= known, f"{name}: not accelerate launch options: {sorted(nested - known)}"

