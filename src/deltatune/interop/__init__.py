"""Moving deltas between deltatune and other libraries' formats."""

from .peft_lora import export_peft_lora, import_peft_lora

__all__ = ["export_peft_lora", "import_peft_lora"]
