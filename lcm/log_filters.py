"""Narrow filters for third-party log lines that are not ours to fix and say nothing to a user of `lcm`.

Installed from `lcm/__init__.py`, before diffusers or transformers are imported (a filter on the stdlib logger
object is in place when the library later fetches the same logger by name). Only exact messages are dropped;
everything else from these loggers still shows.
"""

from __future__ import annotations

import logging
import re

# transformers >= 5 warns once per image-processor class that torchvision is missing when diffusers' pipeline modules
# import CLIPImageProcessor / SiglipImageProcessor (for the safety checker / image encoders). lcm never runs an image
# processor, so the PIL fallback the message announces is irrelevant here.
DROPPED = {
    "transformers.utils.import_utils": re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); "
                                                  r"falling back to `\w+ImageProcessorPil`"),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Attach each filter to its logger once (idempotent)."""
    for name, pattern in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
