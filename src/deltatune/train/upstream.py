"""Lines other libraries print that are wrong for a deltatune run, dropped where the run starts.

peft imports bitsandbytes whenever it is installed (our test extra installs it), and transformers imports
peft on its first `optimization` or `from_pretrained` call. On a CPU with AVX512-BF16, bitsandbytes then
tries to fetch a kernel from the Hugging Face hub and, offline or unverified, logs "Failed to load CPU
gemm_4bit_forward ... make sure you already `pip install kernels`": once per process, in every
`deltatune train`, quickstart and study worker, though no quantized layer is in play and bitsandbytes falls
back to its own kernel. The advice is also wrong (`kernels` is installed). The filter drops that record alone;
`--debug` keeps it."""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_FETCH = "Failed to load CPU gemm_4bit_forward"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_upstream() -> None:
    """Install the filter (idempotent). Call it before transformers first imports peft: a logger's filters
    apply from the moment they are added, and the line is logged while bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropPrefix) and f.prefix == BNB_KERNEL_FETCH for f in logger.filters):
        logger.addFilter(_DropPrefix(BNB_KERNEL_FETCH))
