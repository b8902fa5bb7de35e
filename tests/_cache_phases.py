"""Run by test_cache_multiprocess.py under `accelerate launch` (2 CPU processes): three `lcm cache` runs in one launch,
since a launch costs ~15 s. Arguments: SNAP then the dotted overrides of the cache config.

A: build through the CLI; the cache is copied to SNAP/A.
B: re-run after image 0002 changed; the report goes to SNAP/B.json and the manifest to SNAP/B-manifest.json.
C: re-run at another resolution (every record new, both processes encode) with rank 1 raising right after it wrote
   a shard: a crash between the shards and the manifest, so the launch fails.
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from accelerate import PartialState
from PIL import Image

from lcm import cache
from lcm.cli import main
from lcm.config import load_config

CRASH = "simulated crash of rank 1 after writing its shard"
snap, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config("demo_lcm_lora", overrides)
root = Path(cfg.data.cache_dir)

assert main(["cache", "--config", "demo_lcm_lora", "--batch-size", "4", *overrides]) == 0  # A
state = PartialState()  # the state `lcm cache` set up
assert state.num_processes == 2
if state.is_main_process:
    shutil.copytree(root, snap / "A")
    image = Image.open(Path(cfg.data.path) / "0002.png")
    Image.new("RGB", image.size, (1, 2, 3)).save(Path(cfg.data.path) / "0002.png")  # same size and caption
state.wait_for_everyone()

report = cache.build_cache(cfg, batch_size=4)  # B
if state.is_main_process:
    (snap / "B.json").write_text(json.dumps(dataclasses.asdict(report)))
    shutil.copy(root / cache.MANIFEST, snap / "B-manifest.json")
state.wait_for_everyone()

if state.process_index == 1:  # C
    flush = cache._ShardWriter.flush

    def crash(self):
        flush(self)
        raise RuntimeError(CRASH)

    cache._ShardWriter.flush = crash
main(["cache", "--config", "demo_lcm_lora", "--batch-size", "4", *overrides, "data.resolution=12"])
