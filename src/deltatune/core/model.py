"""`DeltaModel`: a backbone plus named deltas, behaving like the backbone.

The backbone object itself is kept (not copied) and called unchanged; deltas reach it only
through hooks (see `core.delta`). Freezing is remembered per parameter so that removing the
last delta hands back the backbone exactly as it came: same tensors, same `requires_grad` (the task
head excepted, which keeps what training or a loaded delta wrote into it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import checkpointing, conventions, copying, marks, pretrained, replaced, sharded, traffic, unstepped
from .claims import check_claims
from .delta import Delta, DeltaConfig, DeltaError
from .io import save_delta
from .layers import check_in_memory, keep_4bit_unpacked, refuse_quantized_head, trainable_dtype
from .merge import check_commutes, check_head_load, export_merged, merge_in, unmerge_out
from .registry import as_config, check_name, not_a_config
from .routing import RowIds, input_rows, peft_rows
from .settings import check_limits
from .signed import signed_class
from .state import check_state
from .targeting import HEAD_KEY, head_names, head_trains_by_default
from .traffic import Traffic, switch
from .tree import render


class DeltaModel(nn.Module):
    """A transformers model with any number of named deltas attached.

    Calling it, `generate()`, `.config` and every other attribute behave as on the backbone, except
    those that would save or rewrite the weights without the deltas (see `core.conventions`).
    Its state (`state_dict()`) is what training changes: the deltas and the parameters that train.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if isinstance(backbone, DeltaModel):
            raise TypeError("this model already carries deltas; call .add(name, config) on it instead")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"expected a transformers model (a torch.nn.Module), got {type(backbone).__name__}")
        marks.check_not_peft(backbone)  # a PeftModel, or PEFT's layers injected into it
        marks.check_free(backbone)  # another DeltaModel's deltas already act on it
        keep_4bit_unpacked(backbone)  # bitsandbytes' CPU inference layout has no backward
        self.backbone = backbone
        self.deltas = nn.ModuleDict()
        self.train_head = False
        self._head_source: str | None = None  # the loaded delta whose task head the backbone holds (core.io)
        self._requires_grad = {n: p.requires_grad for n, p in backbone.named_parameters()}
        self._traffic = Traffic()  # threads: plain calls together, a routed batch alone
        self.__class__ = signed_class(type(self), type(backbone))  # Trainer reads the signature
        conventions.register_state_hooks(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> DeltaModel:
        """A copy whose hooks act on its own deltas (`core.copying`); a plain deep copy read the original's."""
        return copying.deep_copy(self, memo)

    def __copy__(self) -> DeltaModel:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(copying.NO_PICKLE)

    def __setattr__(self, name: str, value: Any) -> None:
        """Tools wrap `forward` (accelerate's autocast) or replace it (TRL's fused LM head): a replacement that
        computes the loss without it is refused where a delta would silently train wrongly; PEFT wrapping the
        DeltaModel is refused as it marks it (`core.conventions`)."""
        conventions.check_setattr(self, name, value)
        super().__setattr__(name, value)

    # -- behaving as the backbone -------------------------------------------------------------
    def forward(self, *args: Any, delta_ids: RowIds | None = None, **kwargs: Any) -> Any:
        """The backbone's forward; with `delta_ids` (one per row) each row uses its own deltas.

        While training, a returned `loss` includes the deltas' `regularization()` (diff pruning's L0
        penalty, AdaLoRA's orthogonality), as PEFT's AdaLoRA does: any loop that trains on
        `outputs.loss`, `transformers.Trainer` included, trains the method as its paper does.
        """
        self._check_training()
        if (delta_ids := peft_rows(delta_ids, kwargs)) is None:  # PEFT's adapter_names too
            with self._traffic.plain():
                return conventions.with_terms(self, self.backbone(*args, **kwargs))
        with self.route(delta_ids, rows=input_rows(args, kwargs)):
            return conventions.with_terms(self, self.backbone(*args, **kwargs))

    def train(self, mode: bool = True) -> DeltaModel:
        """Also the mode the deltas follow the backbone from (`replaced.watch`): `dm.train(); model.eval()` left them
        training (LoRA's dropout on at inference: 0.06 off)."""
        return replaced.saw_mode(super().train(mode))

    def regularization(self) -> torch.Tensor | None:
        """The sum of the loss terms of the trainable deltas acting now (enabled, or given rows of a routed batch)
        while training; None when there are none. A disabled delta's term trained it while it computed nothing
        (diff pruning's gates moved 1e-2 in 5 steps)."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        trained = (d for d in self.deltas.values() if d.acting and any(p.requires_grad for p in d.parameters()))
        terms = [r for d in trained if (r := d.regularization()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def generate(self, *args: Any, delta_ids: RowIds | None = None, **kwargs: Any) -> Any:
        delta_ids = peft_rows(delta_ids, kwargs)
        conventions.generation_cache(self, delta_ids, kwargs)  # prompt/prefix tuning outgrow a static KV cache
        if delta_ids is None:
            with self._traffic.plain():
                return self.backbone.generate(*args, **kwargs)
        with self.route(delta_ids, rows=input_rows(args, kwargs)):
            return self.backbone.generate(*args, **kwargs)

    def _merged(self) -> list[str]:
        return [n for n, d in self.deltas.items() if d.merged]

    def _check_training(self) -> None:
        """Merged deltas no longer act (the weights hold them); deltas outside FSDP would train per process."""
        sharded.check_inside(self)
        if self.backbone.training and torch.is_grad_enabled() and (merged := self._merged()):
            raise DeltaError(
                f"delta(s) {', '.join(merged)} are merged into the weights, so training would not reach them; "
                "unmerge them first (dm.unmerge(name)), or call dm.eval() to run inference"
            )

    def _refuse_while_merged(self, action: str, names: Iterable[str] | None = None) -> None:
        merged = [n for n in self._merged() if names is None or n in names]
        if merged:
            raise DeltaError(
                f"cannot {action}: delta(s) {', '.join(merged)} are merged into the weights; "
                f"unmerge them first (dm.unmerge({merged[0]!r}))"
            )

    def route(self, delta_ids: RowIds, rows: int | None = None) -> contextlib.AbstractContextManager[None]:
        """Serve a mixed batch: row i uses the deltas named by `delta_ids[i]` (a name, names, or None).

        Inside, enable/disable flags are ignored: each delta acts exactly on its rows. Merged deltas
        would act on every row, so they must be unmerged first. `rows`, when known, is the batch size
        `delta_ids` must match. Other threads' calls wait meanwhile: the rows live on the deltas.
        """
        return traffic.routed_batch(self, delta_ids, rows)

    def _device(self) -> torch.device:
        ref = next(self.backbone.parameters(), None)
        return ref.device if ref is not None else torch.device("cpu")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self._modules.get("backbone")
            if backbone is None:
                raise
            conventions.refuse(name)
            if name in conventions.OWN_FLAGS:
                return conventions.OWN_FLAGS[name](self)
            return getattr(backbone, name)

    # -- managing deltas ----------------------------------------------------------------------
    @switch
    def add(
        self, name: str, config: DeltaConfig | str, *, train_head: bool | str | None = None, enabled: bool = True
    ) -> DeltaModel:
        """Attach another delta; several methods on one backbone are trained jointly.

        `train_head`: True/False, "auto" (`head_trains_by_default`), or None to leave it as it is.
        `enabled=False` attaches it switched off, e.g. a second BitFit delta kept for serving.
        """
        check_name(name)
        if name in self.deltas:
            raise ValueError(f"a delta named {name!r} is already attached; pick another name or detach it first")
        config = as_config(config, self.backbone)  # a name, a delta.json dict, another library's config
        if not isinstance(config, DeltaConfig):
            raise TypeError(not_a_config(config))
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        if train_head == "auto":
            train_head = head_trains_by_default(self.backbone)
        elif not isinstance(train_head, bool) and train_head is not None:
            raise TypeError(f"train_head must be True, False or 'auto', got {train_head!r}")
        config.validate()
        check_in_memory(self.backbone)  # offloaded or never-loaded weights: one line, before anything is built
        sharded.check_unsharded(self, name)  # a delta added under FSDP would lie outside it: each process its own
        check_limits(config, self.backbone)  # sizes bounded by this model, before anything is allocated
        refuse_quantized_head(self, train_head)
        delta = config.build()
        delta.enabled = enabled
        delta.install(self.backbone)
        if enabled:  # beside a merged delta it does not commute with, its outputs would be wrong
            try:
                check_commutes({**self.deltas, name: delta}, name, f"add {name!r}", merged_only=True)
            except DeltaError:
                delta.uninstall()
                raise
        ref = next(self.backbone.parameters(), None)
        if ref is not None:
            delta.to(device=ref.device)
            dtype = trainable_dtype(ref.dtype)  # float32 beside a bf16 or fp16 backbone
            for p in delta.parameters():
                if p.is_floating_point() and p.dtype != dtype and ref.is_floating_point():
                    p.data = p.data.to(dtype)
        delta.train(self.backbone.training)
        self.deltas[name] = delta
        unstepped.watch(self.backbone, self.deltas)  # Trainer(model=backbone) trains no delta: say so
        replaced.watch(self.backbone, self.deltas)  # resize_token_embeddings after attaching: refused, not lost
        checkpointing.watch(self.backbone)  # reentrant gradient checkpointing reaches the deltas too
        marks.mark(self.backbone, self)  # `model` itself: copies keep the deltas, saves refuse to drop them
        if train_head is not None:
            self.train_head = train_head
        self.freeze()
        if train_head is True:
            conventions.check_head_trains(self)
        conventions.check_added(self, name)  # after SFTTrainer patched the forward: refused deltas are detached
        return self

    @switch
    def detach(self, name: str | None = None) -> nn.Module:
        """Remove one delta (or all). With none left, the plain backbone is returned, as it came (its task head
        keeps what training or a loaded delta put there, as PEFT's unload does)."""
        names = list(self.deltas) if name is None else [self._get(name) and name]
        # all or nothing: with any delta merged, removing one would leave the weights out of step
        merged = self._merged()
        if merged:
            own = [n for n in merged if n in names]
            fix = (
                "unmerge this delta before removing it, or the backbone keeps its weights changed"
                if own
                else f"unmerge {', '.join(merged)} before removing any delta"
            )
            raise DeltaError(
                f"cannot detach {repr(name) if name else 'the deltas'}: delta(s) {', '.join(merged)} are merged into "
                f"the weights; {fix} (dm.unmerge({merged[0]!r}))"
            )
        for n in names:
            self.deltas[n].uninstall()
            del self.deltas[n]
        if len(self.deltas) == 0:
            unstepped.unwatch(self.backbone)
            replaced.unwatch(self.backbone)
            checkpointing.unwatch(self.backbone)
            marks.unmark(self.backbone)
            for pname, p in self.backbone.named_parameters():
                p.requires_grad_(self._requires_grad.get(pname, p.requires_grad))
            return self.backbone
        self.freeze()
        return self

    def _get(self, name: str) -> Delta:
        if name not in self.deltas:
            known = ", ".join(self.deltas) or "none"
            raise KeyError(f"no delta named {name!r}; attached deltas: {known}")
        return self.deltas[name]

    def delta(self, name: str = "default") -> Delta:
        return self._get(name)

    @switch
    def enable(self, name: str = "default") -> None:
        delta = self._get(name)
        check_claims(self.deltas, {n for n, d in self.deltas.items() if d.enabled} | {name})
        check_commutes(dict(self.deltas), name, f"enable {name!r}", merged_only=True)
        delta.enabled = True

    @switch
    def disable(self, name: str = "default") -> None:
        """Switch a delta off without removing it: the backbone then computes as if it were absent."""
        self._get(name)
        self._refuse_while_merged(f"disable {name!r} (the weights would still hold it)", [name])
        self.deltas[name].enabled = False

    @switch
    def set_active(self, names: str | list[str]) -> None:
        """Enable exactly these deltas and disable all others."""
        wanted = {names} if isinstance(names, str) else set(names)
        if not isinstance(names, str | list | tuple | set) or not all(isinstance(n, str) for n in wanted):
            raise TypeError(f"set_active takes a delta name or a list of names, got {names!r}")
        for n in wanted:
            self._get(n)
        self._refuse_while_merged("switch deltas (the weights would still hold them)", set(self.deltas) - wanted)
        check_claims(self.deltas, wanted)
        for n in wanted:
            check_commutes(dict(self.deltas), n, f"enable {n!r}", merged_only=True)
        for n, delta in self.deltas.items():
            delta.enabled = n in wanted

    # -- training surface ---------------------------------------------------------------------
    def head_parameter_names(self) -> list[str]:
        heads = tuple(h + "." for h in head_names(self.backbone))
        return [n for n, _ in self.backbone.named_parameters() if heads and n.startswith(heads)]

    def freeze(self, train_head: bool | None = None) -> None:
        """Everything but the deltas (and the task head, when asked) stops receiving gradients."""
        refuse_quantized_head(self, train_head)  # before anything changes
        if train_head is not None:
            self.train_head = train_head
        head = set(self.head_parameter_names()) if self.train_head else set()
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in head)
        for delta in self.deltas.values():
            for p in delta.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)

    def trainable_parameters(self) -> int:
        """Parameters an optimizer would update, each tensor counted once."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def print_trainable_parameters(self) -> None:
        """PEFT's one-line summary, so that a PEFT script's call keeps working (`tree()` shows where they sit)."""
        print(conventions.trainable_line(self.trainable_parameters(), self))

    def delta_parameters(self, name: str | None = None) -> int:
        deltas = self.deltas.values() if name is None else [self._get(name)]
        return sum(p.numel() for d in deltas for p in d.parameters())

    def delta_state_dict(self, name: str = "default", *, include_head: bool = False) -> dict[str, torch.Tensor]:
        """Only the delta's tensors (and the head's, when asked): what a checkpoint needs."""
        state = {k: v.detach() for k, v in self._get(name).state_dict().items()}
        if include_head:
            state.update(self.head_state_dict())
        return state

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The task head's tensors, keyed `__head__.<name>` so they never collide with a delta's."""
        params = dict(self.backbone.named_parameters())
        return {f"{HEAD_KEY}{n}": params[n].detach() for n in self.head_parameter_names()}

    @switch
    def load_delta_state_dict(self, name: str, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a delta's tensors (and task head tensors, `__head__.` keys); no other backbone weight is reachable."""
        delta = self._get(name)
        self._refuse_while_merged(f"load tensors into {name!r} (unmerging would then subtract other values)", [name])
        params = dict(self.backbone.named_parameters())
        heads = {n: params[n] for n in self.head_parameter_names()}
        own, head = check_state(name, delta, state, heads, strict)
        check_head_load(self, head)
        delta.load_state_dict(own, strict=strict)
        with torch.no_grad():
            for n, v in head.items():
                heads[n].copy_(v)

    # -- merging (mergeable methods implement the math) -----------------------------------------
    @switch
    def merge(self, name: str = "default") -> None:
        """Fold the delta into the weights (inference at the backbone's cost); `unmerge` takes it out again."""
        merge_in(self, name, undoable=True)

    @switch
    def unmerge(self, name: str = "default") -> None:
        """Take the delta out of the weights again (bitwise for half-precision merges: `core.merge.unmerge_out`)."""
        unmerge_out(self, name)

    def save_delta(self, path: str, name: str = "default", *, include_head: bool | None = None, **metadata: Any) -> Any:
        """Write only this delta (tensors, config, backbone identity; the task head when it trains) to a folder."""
        return save_delta(self, path, name, include_head=include_head, **metadata)

    def save_pretrained(self, path: str, *, include_head: bool | None = None, **kwargs: Any) -> Any:
        """Every delta (and the head, when it trains) as delta folders, not the backbone; FSDP: `core.sharded`."""
        return pretrained.save_pretrained(self, path, include_head, **kwargs)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, path: str, **kwargs: Any) -> DeltaModel:
        """Attach the deltas `save_pretrained` (or `save_delta`) wrote to `backbone`."""
        return pretrained.load_pretrained(
            backbone if isinstance(backbone, DeltaModel) else DeltaModel(backbone), path, **kwargs
        )

    def merge_and_unload(self) -> nn.Module:
        """The plain backbone with every enabled delta merged in (PEFT's name); the deltas are gone."""
        return pretrained.merge_and_unload(self)

    def export_merged(self, path: str, tokenizer: Any = None) -> Any:
        """A plain transformers folder with every enabled delta merged in; loads without deltatune."""
        return export_merged(self, path, tokenizer)

    def tree(self, **kwargs: Any) -> str:
        return render(self, **kwargs)
