"""What every delta method is made of, without naming any method.

A method is a `DeltaConfig` dataclass (hyperparameters with the papers' defaults) whose
`build()` returns a `Delta`: an `nn.Module` holding the trainable tensors plus an `attach()`
that reaches into the backbone only through `Hooks`. Hooks are the three ways a delta can act
without editing model code: rewrite a module's output, rewrite its inputs, or reparametrize one
of its parameters. Because every change goes through `Hooks`, detaching is generic and exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from . import compiled, registry
from .routing import Route, mark_shared, recompute_rows, routed_input, routed_output
from .settings import check_fields, setting, unknown_setting_message  # noqa: F401 - methods declare fields with `setting`
from .targeting import Layers, Targets, resolve


class DeltaError(RuntimeError):
    """A delta used in a way it does not support (merge of a non-mergeable method, ...)."""


class DeltaIOError(ValueError):
    """A delta folder that cannot be loaded onto this model, with what to do about it."""


@dataclasses.dataclass
class DeltaConfig:
    """Base of every method's config. Subclasses set `method`, `family` and `trains`.

    A subclass that sets `method` registers itself (`core.registry`): defining it is what makes the
    method known. It declares what the rest of the system needs: its size setting (`setting(...,
    size=True)`, what a parameter budget tunes), its fields' types and ranges (checked by `validate`),
    and whether *these* settings can merge (`can_merge`).
    """

    method: ClassVar[str] = ""
    family: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False  # the method can merge with some settings; `can_merge` says whether these can
    merge_requires: ClassVar[str] = ""  # where only some settings merge: which, in words ("non_linearity=identity")
    # merged, it adds a tensor to the weights it acts on (W + dW), so it commutes with other such deltas on the
    # same modules: merging one of them while another acts there unmerged (or enabling one beside a merged one)
    # gives the unmerged outputs; rotations, scalings and DoRA's norm do not (core.merge.check_commutes)
    merge_adds: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate that works for this method at base-model scale
    routable: ClassVar[bool] = True  # can serve some rows of a batch while other rows use other deltas
    peft_names: ClassVar[dict[str, str]] = {}  # PEFT's name of a setting -> ours, for the unknown-setting error

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            registry.register(cls)

    def __new__(cls, *args: Any, **kwargs: Any) -> DeltaConfig:
        """Refuse an unknown setting by name, with deltatune's spelling of PEFT's (users arrive from PEFT:
        `LoRAConfig(target_modules=..., lora_alpha=...)`) or the closest settings, before the dataclass
        `__init__` raises its bare TypeError."""
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = [k for k in kwargs if fields and k not in fields]
        if unknown:
            raise TypeError(unknown_setting_message(cls, unknown[0]))
        return super().__new__(cls)

    @property
    def can_merge(self) -> bool:
        """Whether a delta with *these* settings folds into the weights; methods whose merge depends on a
        setting override this."""
        return self.mergeable

    def build(self) -> Delta:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix; called before anything is attached.

        Every field is checked against its declared type and `setting(...)` range (core.settings);
        subclasses add only the rules that relate fields to each other, after calling this.
        """
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def safe_key(module_name: str) -> str:
    """Module names contain dots, which `nn.ModuleDict` keys may not."""
    return module_name.replace(".", "__")


class _ParamDelta(nn.Module):
    """A parametrization W -> fn(W) that can be switched off without removing it.

    The delta's tensors are *not* registered here (that would put them in the backbone's
    state_dict); `fn` closes over them.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], delta: Delta) -> None:
        super().__init__()
        self.fn = fn
        object.__setattr__(self, "_delta", delta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self._delta
        route = delta.route
        if route is None:
            return self.fn(weight) if delta.active else weight
        # routed: the weights change for every row only if every row is the delta's; otherwise the
        # delta's rows are recomputed with these weights (Hooks.on_param) while `recomputing` is set
        return self.fn(weight) if (route.full or delta.recomputing) and not route.empty else weight


def _scope(delta: Delta, route_aware: bool) -> str | None:
    """Where a hook acts this call: "batch" (every row), "rows" (the delta's rows of a mixed batch) or None."""
    route = delta.route
    if route is None:
        return "batch" if delta.active else None
    if route.empty:
        return None
    return "batch" if route.full or route_aware else "rows"


def param_owners(module: nn.Module, param_name: str) -> list[Delta]:
    """The deltas reparametrizing `module.<param_name>`, in the order they were attached."""
    if not parametrize.is_parametrized(module, param_name):
        return []
    return [p._delta for p in module.parametrizations[param_name] if isinstance(p, _ParamDelta)]


class Hooks:
    """Records every change a delta makes to a backbone so that `remove()` undoes all of it.

    Three verbs act (`on_output`, `on_input`, `on_param`); `shared` is the one place a delta may leave
    state on a backbone module, and it is removed with the last delta that uses it.
    """

    def __init__(self, delta: Delta, model: nn.Module) -> None:
        self.delta = delta
        self.model = model
        self._handles: list[RemovableHandle] = []
        self._params: list[tuple[nn.Module, str]] = []
        self._shared: list[tuple[nn.Module, str]] = []
        self._hooked: list[nn.Module] = []  # modules whose forward this delta rewrites (on_output, on_input)

    def on_output(
        self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict, Any], Any], *, route_aware: bool = False
    ) -> None:
        """`fn(module, args, kwargs, output) -> new output`; skipped while the delta is inactive.

        In a mixed batch `fn` sees only the delta's rows, unless `route_aware` (then it gets the whole
        batch whenever the delta has rows, and reads `delta.route` itself).
        """
        delta = self.delta

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            scope = _scope(delta, route_aware)
            if scope == "rows":
                return routed_output(fn, delta.route, mod, args, kwargs, output)
            return fn(mod, args, kwargs, output) if scope else None

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self._hooked.append(module)

    def on_input(
        self,
        module: nn.Module,
        fn: Callable[[nn.Module, tuple, dict], tuple[tuple, dict]],
        *,
        route_aware: bool = False,
    ) -> None:
        """`fn(module, args, kwargs) -> (args, kwargs)`; skipped while the delta is inactive (see `on_output`)."""
        delta = self.delta

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            scope = _scope(delta, route_aware)
            if scope == "rows":
                return routed_input(fn, delta.route, mod, args, kwargs)
            return fn(mod, args, kwargs) if scope else None

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self._hooked.append(module)

    def on_param(
        self, module: nn.Module, param_name: str, fn: Callable[[torch.Tensor], torch.Tensor], name: str = ""
    ) -> None:
        """Reparametrize `module.<param_name>` as `fn(original)` while the delta is active (`name`: the module's).

        Several deltas may reparametrize one parameter (many BitFit deltas served from one backbone),
        but at most one of them may be enabled at a time: two active changes to one tensor would be
        trained as one and could not be told apart.
        """
        if self.delta.enabled:
            for other in param_owners(module, param_name):
                if other.enabled:
                    raise DeltaError(
                        f"parameter {param_name!r} of {type(module).__name__} is already claimed by another "
                        "delta that is enabled; two deltas cannot reparametrize the same parameter at once: narrow one "
                        "of their targets, or attach this one disabled (enabled=False) to serve them one at a time"
                    )
        mark_shared(module, name)
        parametrize.register_parametrization(module, param_name, _ParamDelta(fn, self.delta), unsafe=True)
        if not any(m is module for m, _ in self._params):
            self._handles.append(module.register_forward_hook(self._recompute_rows, with_kwargs=True, prepend=True))
        self._params.append((module, param_name))

    def _recompute_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Runs before the module's other forward hooks (prepend), so deltas acting on its output add to
        the recomputed rows as they would to a batch of them alone (routing.recompute_rows)."""
        return recompute_rows(self.delta, module, args, kwargs, output)

    def shared(self, module: nn.Module, key: str) -> list[Delta]:
        """The deltas of this kind attached to `module`, this one last: a list every one of them holds.

        Deltas that must coordinate on one module (prompts on one stack take turns in a mixed batch) meet
        here; the list lives on the module while any of them is attached and is gone with the last one.
        """
        attr = f"_deltatune_{key}"
        peers: list[Delta] = module.__dict__.setdefault(attr, [])
        peers.append(self.delta)
        self._shared.append((module, attr))
        return peers

    def claimed(self) -> list[tuple[nn.Module, str]]:
        """(module, parameter name) pairs this delta reparametrizes."""
        return list(self._params)

    def hooked(self) -> list[nn.Module]:
        """Modules whose calls this delta rewrites: it acts only when they are called, not when a tool reads
        their weights directly (TRL's fused LM head reads `lm_head.weight`; see `core.conventions`)."""
        return list(self._hooked)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name in reversed(self._params):
            plist = module.parametrizations[name]
            ours = [i for i, p in enumerate(plist) if isinstance(p, _ParamDelta) and p._delta is self.delta]
            if len(ours) < len(plist):  # other deltas still reparametrize it: drop only our link
                for i in reversed(ours):
                    del plist[i]
                continue
            requires_grad = plist.original.requires_grad
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            getattr(module, name).requires_grad_(requires_grad)
        for module, attr in self._shared:
            peers = module.__dict__.get(attr, [])
            peers[:] = [d for d in peers if d is not self.delta]
            if not peers:
                module.__dict__.pop(attr, None)
        self._handles.clear()
        self._params.clear()
        self._shared.clear()
        self._hooked.clear()


class Delta(nn.Module):
    """One method's trainable tensors and the way they act on the backbone.

    Subclasses implement `attach`; mergeable ones implement `merge_into`/`unmerge_from`.
    `sites` maps each backbone module the delta touches to the number of delta parameters
    living there, which the tree view and `inspect` display.
    """

    def __init__(self, config: DeltaConfig) -> None:
        super().__init__()
        self.config = config
        self.enabled = True
        self.merged = False
        self._undo: dict[tuple[str, str], torch.Tensor] = {}  # a half-precision merge's weights before it (core.merge)
        self._merge_seq = -1
        self.sites: dict[str, int] = {}
        self._hooks: Hooks | None = None
        self.route: Route | None = None  # set by DeltaModel.route for a mixed batch
        self.recomputing = False
        # settings finalize() changed (prefix: reparameterize=False): the config stays what was asked for, and
        # delta.json records these beside it, so that loading builds the delta as it is now
        self.finalized: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        """Hooks act only when enabled and not already folded into the weights."""
        return self.enabled and not self.merged

    def targets(self, model: nn.Module, targets: Targets, layers: Layers = None) -> list[str]:
        return resolve(model, targets, layers)

    @classmethod
    def check_rows(cls, routed: list[tuple[Delta, Route]]) -> None:
        """A rule the deltas of this class set on a mixed batch as a whole (prompt tuning: one prompt per row),
        checked when the rows are given, so that its row numbers are the caller's; none by default."""

    def check_generation(self, kwargs: dict[str, Any]) -> None:
        """Refuse `generate(**kwargs)` arguments this delta cannot generate with (it acts in the call); none by
        default."""

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Refused while merged: the weights hold the old values, which unmerge must subtract exactly."""
        if self.merged:
            raise DeltaError("this delta is merged into the weights; unmerge it before loading other tensors into it")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def install(self, model: nn.Module) -> None:
        if (wrapped := compiled.refuse_wrapped(model)) is not None:
            raise DeltaError(f"cannot attach {self.config.method}: {wrapped}")
        compiled.guard_hooks()  # a graph compiled before now must notice these hooks (core.compiled)
        hooks = Hooks(self, model)
        try:
            self.attach(model, hooks)
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks

    def uninstall(self) -> None:
        if self.merged:
            raise DeltaError("unmerge this delta before removing it, or the backbone keeps its weights changed")
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def regularization(self) -> torch.Tensor | None:
        """A term the training loop adds to the loss (e.g. diff pruning's L0 penalty); None for most methods."""
        return None

    def has_loss_term(self) -> bool:
        """Whether `regularization()` adds a non-zero term while training, without computing it (a loop that
        computes the loss itself, not through `DeltaModel.forward`, would leave it out; see `core.conventions`)."""
        return False

    def hooked_modules(self) -> list[nn.Module]:
        """The backbone modules whose calls this delta rewrites (`Hooks.hooked`); empty when not installed."""
        return self._hooks.hooked() if self._hooks is not None else []

    @property
    def acting(self) -> bool:
        """Whether the delta acts in the call running now: active, or given rows of the routed batch."""
        return _scope(self, route_aware=True) is not None

    def took_part(self) -> bool:
        """Whether the optimizer step just taken trained this delta: enabled, or with gradients (rows of mixed
        batches). A disabled delta computes as if absent, so its schedule (AdaLoRA's rank budget) waits: run on
        it, it pruned a disabled delta's ranks on importances it never earned."""
        return self.enabled or any(p.grad is not None for p in self.parameters())

    def on_step(self, step: int, total: int) -> None:
        """Called by `fit` after optimizer step `step` (from 1) of `total`, before the gradients are cleared.

        Methods whose structure follows a schedule over training hook in here (a rank budget reallocated by
        importance); most do nothing.
        """

    def schedule_state(self) -> dict[str, torch.Tensor]:
        """Tensors a training schedule keeps outside the parameters (importance averages, masks).

        A resumed run must continue the schedule exactly where it stopped, so `fit`'s checkpoint
        stores these beside the optimizer's moments; they never go into the saved delta.
        """
        return {}

    def load_schedule_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what `schedule_state` returned (when resuming a run)."""

    def finalize(self) -> None:
        """Called once when training ends, before scoring: prune a sparse diff, drop a reparameterization MLP, ...

        A method whose structure changes records the settings it now has in `self.finalized`; it never
        edits `self.config` (what the user asked for, and what delta.json's "config" keeps).
        """

    def merge_into(self, model: nn.Module) -> None:
        raise DeltaError(
            f"{self.config.method} cannot be merged into the backbone's weights "
            "(it adds computation a weight change cannot express); keep it unmerged"
        )

    def unmerge_from(self, model: nn.Module) -> None:
        self.merge_into(model)

    def unmerge_refusal(self) -> str | None:
        """Why `unmerge_from` could not undo a merge of the delta as it is now; None when it can.

        `DeltaModel.merge` asks before merging: a merge that cannot be undone would leave the backbone
        changed for good behind a call that promises a way back.
        """
        return None
