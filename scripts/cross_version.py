"""Delta files across transformers releases: `save` under one, `load` under another; compare logits.

    venv-old/bin/python scripts/cross_version.py save DIR   # a delta and its backbone per arch x method
    venv-new/bin/python scripts/cross_version.py load DIR   # prints every case off by 1e-5 or failing

The backbone travels with save_pretrained (two releases may initialise a random config differently);
the delta with deltatune's save_delta. docs/compat.md has the result (4.57.6 <-> 5.25.0).
"""

import pathlib
import sys

import torch
import transformers as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tiny import CASES, logits, make_inputs, make_model  # noqa: E402

import deltatune as dt  # noqa: E402

mode, root = sys.argv[1], pathlib.Path(sys.argv[2])
METHODS = ["lora", "adapter", "prefix", "prompt", "bitfit", "ia3", "layernorm", "dora", "oft"]
report = {}
for arch, head in CASES:
    for m in METHODS:
        key = f"{arch}-{head}-{m}"
        d = root / key
        try:
            if mode == "save":
                model = make_model(arch, head).eval()
                dm = dt.attach(model, dt.get_config(m), train_head=False)
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in dm.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn(p.shape, generator=g) * 0.05)
                dm.eval()
                inputs = make_inputs(model)
                y = logits(dm, inputs)
                dm.save_delta(str(d / "delta"), include_head=True)
                plain = dm.detach()
                plain.save_pretrained(d / "base")
                torch.save({"inputs": inputs, "y": y}, d / "ref.pt")
                report[key] = "saved"
            else:
                ref = torch.load(d / "ref.pt", weights_only=True)
                cls = type(make_model(arch, head))
                base = cls.from_pretrained(d / "base").eval()
                dm = dt.load_delta(base, str(d / "delta")).eval()
                y = logits(dm, ref["inputs"])
                report[key] = float((y - ref["y"]).abs().max())
        except Exception as e:
            report[key] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
print(tf.__version__, mode)
for k, v in report.items():
    if not (isinstance(v, float) and v < 1e-5) and v != "saved":
        print(k, v)
print("ok:", sum(1 for v in report.values() if (isinstance(v, float) and v < 1e-5) or v == "saved"), "of", len(report))
