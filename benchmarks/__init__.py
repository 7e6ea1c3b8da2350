"""deltatune's benchmarks against full fine-tuning and PEFT: `python -m benchmarks --help`."""
