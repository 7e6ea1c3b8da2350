"""sentence-transformers: deltas on a `SentenceTransformer`, trained with its own trainer.

`dm = dt.attach(st, "lora")` attaches to the transformer inside the model (`st.encode` and `dm.encode` then
embed with the deltas), and `SentenceTransformerTrainer(model=dm, ...)` trains the deltas alone, checkpointing
them with `dm.save_pretrained`. What needed care (each measured on all-MiniLM-L6-v2 with LoRA):
- `st.save(dir)` wrote the model without the deltas (reloaded: the base model's embeddings, 0.24 off): it is
  refused while deltas are attached (`core.marks` marks the transformer inside), and `dm.export_merged(dir)`
  writes a merged sentence-transformers folder that `SentenceTransformer(dir)` loads;
- its trainer reloads a checkpoint (`load_best_model_at_end`, `resume_from_checkpoint`) by rebuilding the
  model's class from the folder: 5.x calls `type(model)(folder)` (`core.signed` answers it), 6.x
  `type(model)._load_with_module_classes(folder, ...)`, registered here. Before, the best checkpoint's load
  failed into a logged error and the last step's deltas stayed; a resume stopped on an AttributeError.
`SentenceTransformerTrainer(model=st)` trains nothing, as `Trainer(model=backbone)` (the optimizer does not
hold the deltas): `core.unstepped` warns, and its first checkpoint is refused as above.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.registry import CLASS_EXTRAS
from ..core.reload import SavedDeltas


def _load_with_module_classes(cls: type, path: str | os.PathLike, *args: Any, **kwargs: Any) -> SavedDeltas:
    """sentence-transformers 6's reload of a checkpoint of the model under training: the deltas it holds."""
    return SavedDeltas(path)


def class_extras(backbone_cls: type) -> dict[str, Any]:
    """What sentence-transformers' trainer calls on the class of a DeltaModel over one of its models."""
    if not backbone_cls.__module__.startswith("sentence_transformers."):
        return {}
    return {"_load_with_module_classes": classmethod(_load_with_module_classes)}


CLASS_EXTRAS.append(class_extras)
