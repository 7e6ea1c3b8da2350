"""The settings one subspace study runs under, written once to `<workdir>/study.json` and read by every stage.

Keeping them in one file means `find`, `optimize` and the rest cannot drift from what `collect`
trained with (the same few-shot samples, the same heads, the same method sizes), and a resumed run
picks up exactly the study it left.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..core.delta import DeltaConfig
from ..methods import METHODS, get_config
from .flatten import write_json
from .sources import TaskData, check_name, resolve, resolve_all, task_data

__all__ = ["StudyConfig", "TaskData", "task_data"]

# Sized for MiniLM-L6 (6 layers, hidden 384) so the flattened solutions are about the same size:
# LoRA r=10 on query and value: 6 x 2 x 10 x (384 + 384) = 92,160; prefix 20 tokens: 6 x 2 x 20 x 384 =
# 92,160 (kept after finalize(); trained through an MLP of width 24, the paper's "rank 24");
# a Pfeiffer adapter (after the FFN) with bottleneck 20: 6 x (2 x 384 x 20 + 20 + 384) = 94,584;
# selective: full fine-tuning of the last layer's attention output projection, 147,840.
PRESETS: dict[str, dict[str, Any]] = {
    "adapter": {"placement": "pfeiffer", "bottleneck": 20},
    "lora": {"r": 10, "targets": ["attn.q", "attn.v"]},
    "prefix": {"num_tokens": 20, "mid_dim": 24},
    "selective": {"targets": ["attn.o"], "layers": -1},
}
# Methods whose trained delta is more than its flat vector: a subspace point run through them would not be
# the solution it stands for (measured: diff pruning's logits 1e-3 off its own solution's, no error).
UNUSABLE = {
    "diff_pruning": "a trained diff-pruning delta keeps a mask of the entries that survived pruning, which its "
    "flat vector does not hold, so every point of a subspace would run through another solution's mask; use "
    "selective or random_subset for a sparse subset of the weights",
}
# AdamW rates for short few-shot runs (the library defaults suit thousands of steps).
LEARNING_RATES = {"adapter": 2e-3, "lora": 2e-3, "prefix": 2e-3, "selective": 3e-4}


@dataclasses.dataclass
class StudyConfig:
    model: str = "minilm-l6"
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["sst2", "mr", "cr", "subj"])
    unseen: list[str] = dataclasses.field(default_factory=list)  # held out of the multi-task subspace
    methods: list[str] = dataclasses.field(default_factory=lambda: list(PRESETS))
    method_args: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: json.loads(json.dumps(PRESETS)))
    lrs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(LEARNING_RATES))
    k_shot: int = 32
    dev_k: int = 16  # few-shot dev examples per class (model selection only)
    n_eval: int = 256  # examples of the task's dev split every score is measured on
    seed: int = 42
    # seeds of the solutions collected per (task, method); None = [seed]. More than one lets `find --which
    # heldout` build each task's subspace from the OTHER seeds' solutions (see `other_seeds`)
    solution_seeds: list[int] | None = None
    max_length: int = 64
    batch_size: int = 16
    steps: int = 80  # training steps of each collected solution (and of the head)
    eval_every: int = 20
    head_lr: float = 5e-3
    d: int = 4
    hidden: int = 64  # width of the down-projections
    alpha: float = 1.0  # weight of the reconstruction distance in the finding loss
    find_steps: int = 40  # per task
    scratch_find_steps: int = 150  # per task, for projections trained from scratch (`find --init random`)
    optimize_steps: int = 60
    optimize_lr: float = 0.05  # Adam rate of the d-dim vector, in units of the typical solution norm
    d_max: int = 4096  # intrinsic-dimension search stops here
    said_steps: int = 60
    # the user's own data (sources.py): where each task given as a path is read from (name -> absolute path),
    # which of its columns is which field, and the fraction of train held out as dev where a task has none
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    columns: dict[str, str] | None = None
    dev_split: float | None = None

    def method_config(self, method: str) -> DeltaConfig:
        args = dict(self.method_args.get(method, {}))
        for key, value in args.items():
            if isinstance(value, list):
                args[key] = tuple(value)
        return get_config(method, **args)

    def task_names(self, texts: list[str]) -> list[str]:
        """The study's names for `texts`: its task names, the paths its own data was given as, or another
        spelling of a collection name (SST-2). A task the study does not have is refused, naming its tasks."""
        names = []
        for text in texts:
            name = text if text in self.tasks else None
            if name is None:
                try:
                    found, source = resolve(text)
                except ValueError:
                    found, source = None, None
                if found in self.tasks and self.sources.get(found) == source:
                    name = found
            if name is None:
                raise ValueError(f"{text} is not a task of this study ({', '.join(self.tasks)})")
            names.append(name)
        return names

    def configs(self) -> dict[str, DeltaConfig]:
        return {m: self.method_config(m) for m in self.methods}

    @property
    def seen(self) -> list[str]:
        return [t for t in self.tasks if t not in self.unseen]

    @property
    def seeds(self) -> list[int]:
        """Every solution seed, the study's own first: its solutions are the ones every score is compared with."""
        return [self.seed, *(s for s in self.solution_seeds or () if s != self.seed)]

    @property
    def other_seeds(self) -> list[int]:
        """The seeds a held-out subspace is found from: all but the study's seed, which is held out.

        One held-out seed per task (not every fold): the held-out seed's solution is the very one the
        in-sample spaces are compared with, so both settings share their reference scores and differ only
        in whether that solution shaped the space; each further fold would cost a find, 4 optimizations
        and 12 transfers per task for the same question.
        """
        return self.seeds[1:]

    def validate(self) -> None:
        if len(self.tasks) != len(set(self.tasks)):
            raise ValueError(f"a task is listed twice in {self.tasks}")
        stray = [t for t in self.unseen if t not in self.tasks]
        if stray:
            raise ValueError(f"--unseen names tasks not in --tasks: {stray}; list them in --tasks too")
        if self.unseen and not self.seen:
            raise ValueError("every task is unseen: leave at least one task to find the multi-task subspace on")
        if len(self.methods) != len(set(self.methods)):
            raise ValueError(f"a method is listed twice in --methods {','.join(self.methods)}")
        for m in self.methods:
            if m not in METHODS:  # the registry's refusal names the closest method
                get_config(m)
            if m in UNUSABLE:
                raise ValueError(f"--methods {m}: {UNUSABLE[m]}")
        for flag, given in (("--method-arg", self.method_args), ("--lr", self.lrs)):
            # a setting for a method the study does not run is a typo (`--lr lroa=1e-3`) that would leave
            # the intended method at its default without a word; the presets of unused methods are not
            stray = [m for m in given if m not in self.methods and not _preset(flag, m, given[m])]
            if stray:
                raise ValueError(
                    f"{flag} names {stray[0]!r}, which is not among --methods {','.join(self.methods)}; "
                    "fix the name or add the method to --methods"
                )
        for m, rate in self.lrs.items():  # a negative rate ascends the loss, and the study.json keeps it
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
                raise ValueError(f"--lr {m} must be a finite number > 0, got {rate!r}")
        if self.solution_seeds is not None:
            if len(set(self.solution_seeds)) != len(self.solution_seeds):
                raise ValueError(f"a seed is listed twice in --solution-seeds {self.solution_seeds}")
            if self.seed not in self.solution_seeds:
                raise ValueError(
                    f"--solution-seeds {self.solution_seeds} must include the study's --seed {self.seed}: its "
                    "solutions are the reference every score is compared with"
                )
        for t in self.tasks:
            check_name(t)
        if self.dev_split is not None and not 0 < self.dev_split < 1:
            raise ValueError(f"--dev-split must be a fraction between 0 and 1, e.g. 0.2; got {self.dev_split}")
        if self.d <= 0:
            raise ValueError(f"the intrinsic dimension d must be positive, got {self.d}")
        if self.hidden < self.d:  # found out at `find`, after the whole collect, otherwise
            raise ValueError(f"--hidden {self.hidden} (the down-projections' width) must be at least --d {self.d}")
        for m in self.methods:
            self.method_config(m).validate()

    def save(self, workdir: str | Path) -> None:
        write_json(Path(workdir) / "study.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, workdir: str | Path) -> StudyConfig:
        path = Path(workdir) / "study.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; start the study with `deltatune subspace collect --workdir ...`"
            )
        return cls(**_checked_json(path))

    @classmethod
    def start_or_resume(cls, workdir: str | Path, given: dict[str, Any]) -> StudyConfig:
        """The study in `workdir`: started with `given` (over the defaults) if it has no study.json yet, else
        resumed, refusing settings that differ from what it was started with (`tasks` may grow).

        `lrs` merge per method into what is there, `method_args` per method AND per setting (`--method-arg
        lora.r=8` keeps the preset's targets); every other setting replaces.
        """
        path = Path(workdir) / "study.json"
        fresh = not path.exists()
        cfg = cls() if fresh else cls.load(workdir)
        given = dict(given)
        if "model" in given and Path(given["model"]).expanduser().exists():  # a local folder, read from any folder
            given["model"] = str(Path(given["model"]).expanduser().resolve())
        if fresh and "tasks" in given:  # paths become names, their absolute paths `sources` (sources.py)
            given["tasks"], added = resolve_all(given["tasks"], [], {})
            given["sources"] = added
        if "unseen" in given:  # named as in --tasks (a path, or the name a path was given)
            known = (
                (given.get("tasks", cfg.tasks), given.get("sources", cfg.sources))
                if fresh
                else (cfg.tasks, cfg.sources)
            )
            given["unseen"] = resolve_all(given["unseen"], *known)[0]
        if fresh:
            for key, value in given.items():
                setattr(cfg, key, _merged(cfg, key, value))
            cfg.validate()
            for name in cfg.sources:  # the user's own data is read now: a missing column or dev split is
                task_data(name, cfg)  # said before the study exists, not at collect
            _check_dev_split_used(cfg)
            cfg.save(workdir)
            return cfg
        merged = {k: _merged(cfg, k, v) for k, v in given.items()}
        differ = [k for k, v in merged.items() if k != "tasks" and getattr(cfg, k) != v]
        if differ:
            raise ValueError(
                f"{path} was started with other settings ({', '.join(differ)}); resume without them or use a new --workdir"
            )
        return cfg


def _check_dev_split_used(cfg: StudyConfig) -> None:
    """--dev-split holds dev out of train only for tasks without a dev split: where every task has one, the flag
    changes nothing, which a user who asked for it should hear."""
    if cfg.dev_split is None:
        return
    from ..data.tasks import load_task

    tasks = list(dict.fromkeys([*cfg.tasks, *cfg.unseen]))
    if all("dev" in load_task(cfg.sources.get(t, t), columns=cfg.columns).splits for t in tasks):
        warnings.warn(
            f"every task of the study has its own dev split, so --dev-split {cfg.dev_split:g} is unused "
            "(it holds dev out of train only for tasks without one)",
            stacklevel=3,
        )


def _checked_json(path: Path) -> dict[str, Any]:
    """study.json's settings, refused when a hand edit broke them: every stage reads them, and a misspelt key
    (`"find_step": 100`) was ignored without a word, a quoted number (`"d": "4"`) failed deep in a stage."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); was it edited by hand? fix it or start a new --workdir"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a subspace study's settings; is --workdir another tool's folder?")
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (a newer deltatune's, or an edit?)"
            raise ValueError(f"{path} has a setting {key!r} the subspace study does not know{hint}")
        default = fields[key].default
        if default is None or default is dataclasses.MISSING or value is None:
            continue
        kind = float if type(default) is float else type(default)  # an int is a fine float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))  # fmt: skip
        if not ok:
            raise ValueError(f"{path}: {key} must be {kind.__name__}, got {value!r}; was it edited by hand?")
    return data


def _merged(cfg: StudyConfig, key: str, value: Any) -> Any:
    """`value` over what `cfg` has for `key`: per method for `lrs`, per method and setting for `method_args`.

    Replacing a method's whole settings by the one given would silently drop the rest of its preset:
    `--method-arg selective.layers=-2` would tune every weight of the layer instead of its attention
    output, `--method-arg prefix.num_tokens=10` would train through an MLP of width 512 instead of 24.
    """
    if key == "method_args":
        return {**cfg.method_args, **{m: {**cfg.method_args.get(m, {}), **v} for m, v in value.items()}}
    if key == "lrs":
        return {**cfg.lrs, **value}
    return value


def _preset(flag: str, method: str, value: Any) -> bool:
    """Whether `value` is the default a study carries for `method` (kept for methods it does not run)."""
    return (PRESETS if flag == "--method-arg" else LEARNING_RATES).get(method) == value
