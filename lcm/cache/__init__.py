"""The latent cache (`lcm cache`): encode a dataset once, then train without the VAE or the text encoders.

What is stored, per training item, in safetensors shards under `data.cache_dir`:
- the VAE posterior's moments (μ, σ) in latent units, not one sample: training draws z₀ = μ + σ·ε afresh each step
  from the step's generator, exactly as the uncached path does, so caching changes no random draw;
- the text conditioning dicts (cond, uncond) that `encode.encode_text` returns, whatever keys the model family uses
  (SDXL: token + pooled embeddings + time_ids; SD1.5: token embeddings). Unconditional tensors that are equal to the
  empty caption's (SDXL's zeros, SD1.5's empty-prompt encoding) are stored once, not per item.

The package, by concern (each module's docstring says more):
- `format`: record keys and encoder identities (an image/caption/crop/flip + the encoders' file digests), the
  checksummed shard reads (a damaged or missing shard raises `CacheError`, never wrong data), the manifest, and the
  check that a cache matches the config it trains with;
- `dataset`: `CachedDataset`, the training items read back (center crops only; both flips when
  `data.random_flip=true`, picked with the uncached loader's coin);
- `build`: `build_cache`, which re-encodes exactly the records whose key changed, reuses the rest after checking
  them, and under `accelerate launch --num_processes N` shares the encoding between processes.

Everything other modules, tests and scripts use is importable from `lcm.cache` itself.
"""

from .build import CacheReport, _ShardWriter, build_cache
from .dataset import CachedDataset
from .format import FORMAT, MANIFEST, CacheError, check_cache_matches, encoder_identity, read_manifest

__all__ = ["FORMAT", "MANIFEST", "CacheError", "CacheReport", "CachedDataset", "build_cache", "check_cache_matches",
           "encoder_identity", "read_manifest"]
