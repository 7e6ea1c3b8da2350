"""Mixed-batch serving: many deltas on one backbone, each row of one forward using its own.

The property checked everywhere: a row of a mixed batch gets exactly the output it gets when the
whole batch runs with that row's deltas (and when the row runs alone).
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model, same_state, state

import deltatune as dt
from deltatune.core.routing import RoutingError

# method -> config kwargs that make it small and valid on every tiny model
ROUTABLE = {
    "lora": {},
    "ia3": {},
    "bitfit": {},
    "adapter": {},
    "prompt": {"num_tokens": 3},
    "parallel_adapter": {},
    "norm_adapter": {},
    "compacter": {},
    "lowrank_adapter": {},
    "layernorm": {},
    "selective": {},
    "diff_pruning": {},
    "said": {"targets": ("attn.q",), "dim": 16},
}
ARCHS = [("bert", "cls"), ("llama", "lm"), ("bart", "lm")]


def _perturb(dm: dt.DeltaModel, seed: int = 7) -> None:
    """Random non-zero deltas: at init most methods are the identity, which would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in dm.deltas.values():
            for p in delta.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(model: torch.nn.Module, batch: int = 4) -> dict[str, torch.Tensor]:
    inputs = make_inputs(model, batch=batch)
    labels = inputs.pop("labels")
    if model.config.is_encoder_decoder and labels.dim() == 2:
        inputs["decoder_input_ids"] = labels
    return inputs


def _served(method: str, arch: str, head: str, names: tuple[str, ...] = ("a", "b")) -> dt.DeltaModel:
    model = make_model(arch, head)
    dm = dt.DeltaModel(model)
    for n in names:
        dm.add(n, dt.METHODS[method](**ROUTABLE[method]), enabled=False)
    _perturb(dm)
    return dm


@pytest.mark.parametrize("arch,head", ARCHS, ids=lambda v: v)
@pytest.mark.parametrize("method", list(ROUTABLE))
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(method: str, arch: str, head: str) -> None:
    dm = _served(method, arch, head)
    inputs = _inputs(dm.backbone)
    ids = ["a", "b", "b", "a"] if method == "prompt" else ["a", None, "b", "a"]
    with torch.no_grad():
        mixed = dm(**inputs, delta_ids=ids).logits
    for i, name in enumerate(ids):
        dm.set_active([] if name is None else name)
        alone = logits(dm, inputs)
        torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=1e-5)


def test_a_row_equals_that_row_run_on_its_own() -> None:
    dm = _served("lora", "llama", "lm", names=("a", "b", "c"))
    inputs = _inputs(dm.backbone)
    inputs["attention_mask"][:] = 1  # unpadded rows, so a row alone is the same computation
    ids = ["c", "a", "b", None]
    with torch.no_grad():
        mixed = dm(**inputs, delta_ids=ids).logits
        for i, name in enumerate(ids):
            dm.set_active([] if name is None else name)
            row = dm(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(mixed[i : i + 1], row, rtol=0, atol=1e-5)


def test_peft_s_adapter_names_route_rows_as_delta_ids_do() -> None:
    """`adapter_names=[..., "__base__"]` (PEFT's mixed batch) was passed on to Llama's forward, which takes unknown
    keywords and dropped it: every row ran with every enabled delta, with no error."""
    dm = _served("lora", "llama", "lm")
    dm.set_active(["a", "b"])
    inputs = _inputs(dm.backbone)
    with torch.no_grad():
        routed = dm(**inputs, delta_ids=["a", None, "b", "a"]).logits
        peft_named = dm(**inputs, adapter_names=["a", "__base__", "b", "a"]).logits
        assert torch.equal(peft_named, routed) and not torch.allclose(routed, dm(**inputs).logits)
        kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(
            dm.generate(**inputs, adapter_names=["b", "a", "__base__", "b"], **kwargs),
            dm.generate(**inputs, delta_ids=["b", "a", None, "b"], **kwargs),
        )
    with pytest.raises(RoutingError, match="delta_ids or PEFT's adapter_names, not both"):
        dm(**inputs, delta_ids=["a"] * 4, adapter_names=["a"] * 4)
    for typo, meant in (("delta_id", "delta_ids"), ("deltas", "delta_ids"), ("adapter_name", "adapter_names")):
        with pytest.raises(RoutingError, match=f"unknown keyword '{typo}'; did you mean {meant}\\?"):
            dm(**inputs, **{typo: ["a"] * 4})  # the model's **kwargs would drop it: all rows, all deltas


def test_threads_sharing_a_model_each_get_their_own_rows() -> None:
    """Two server threads routing mixed batches through one model, a third calling it plainly: the rows live on
    the deltas while a routed batch runs, so another thread's call read them (before: 197 RoutingErrors about
    row counts and 1 wrong output in 2 x 200 calls). Routed batches now run alone; plain calls together."""
    dm = _served("lora", "bert", "cls", names=("a", "b", "c"))
    dm.set_active("a")
    batches = [(_inputs(dm.backbone, batch=4), ["a", "b", None, "c"]), (_inputs(dm.backbone, batch=2), ["c", "c"])]
    plain = _inputs(dm.backbone, batch=3)
    with torch.no_grad():
        expected = [dm(**x, delta_ids=ids).logits for x, ids in batches] + [dm(**plain).logits]
    calls = [lambda x=x, ids=ids: dm(**x, delta_ids=ids).logits for x, ids in batches] + [lambda: dm(**plain).logits]
    assert _concurrently(calls, expected, times=40) == [40, 40, 40]


def _concurrently(calls: list, expected: list[torch.Tensor], times: int) -> list[int]:
    """Each call `times` times in a thread of its own, all at once: how often each gave its expected output."""
    results: list[list[bool]] = [[] for _ in calls]

    def serve(i: int) -> None:
        for _ in range(times):
            with torch.no_grad():
                results[i].append(torch.equal(calls[i](), expected[i]))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [sum(r) for r in results]


def test_the_backbone_called_itself_waits_while_another_thread_routes() -> None:
    """`model(...)`, the backbone users keep after `dt.attach`, passes the DeltaModel's forward: beside another
    thread's routed batches of the same size it ran with their rows and deltas (wrong logits, no error), with
    other sizes it failed with a RoutingError. It now waits at the backbone's own gate (`core.traffic.Gate`)."""
    dm = _served("lora", "bert", "cls", names=("a", "b", "c"))
    dm.set_active("a")
    routed, plain = _inputs(dm.backbone, batch=4), _inputs(dm.backbone, batch=4)
    ids = ["b", "c", None, "b"]
    with torch.no_grad():
        expected = [dm(**routed, delta_ids=ids).logits, dm.backbone(**plain).logits]
    calls = [lambda: dm(**routed, delta_ids=ids).logits, lambda: dm.backbone(**plain).logits]
    assert _concurrently(calls, expected, times=60) == [60, 60]


def test_the_backbone_gate_is_released_after_an_error_and_removed_with_the_last_delta() -> None:
    """A raw call that fails inside the model leaves the gate (else the next routed batch waited for good); a deep
    copy gates on its own traffic; `detach()` gives the backbone back with the hooks it came with."""
    model = make_model("bert")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))  # a fresh model's
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    x = _inputs(dm.backbone, batch=2)
    with pytest.raises(Exception):  # noqa: B017 - any error raised inside the model's forward
        dm.backbone(input_ids=x["input_ids"][:, :0].float())
    twin = copy.deepcopy(dm)
    done: list[bool] = []

    def other() -> None:
        with torch.no_grad():
            twin.backbone(**x)  # the copy's gate: not held by the original's routed batch below
            dm(**x, delta_ids=["a", "b"])  # waits for the routed batch, then runs: the failed call left the gate
        done.append(True)

    with dm.route(["b", "a"]):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.2)
        assert dm._traffic._plain == {}  # the original's own gate is not held by the copy's call
    thread.join(timeout=30)
    assert done == [True]
    plain = dm.detach()
    assert (len(plain._forward_pre_hooks), len(plain._forward_hooks)) == hooks


def test_a_raw_call_stopped_by_keyboard_interrupt_does_not_hold_the_model() -> None:
    """torch runs always-called hooks for an Exception only: a notebook's stop button (KeyboardInterrupt) inside a
    raw backbone call left this thread counted inside, and every later routed batch of another thread (a demo
    server started afterwards) waited for good. A gated call whose frame left the thread's stack no longer counts."""
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    x = _inputs(dm.backbone, batch=2)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    hook = dm.backbone.bert.encoder.layer[0].register_forward_hook(stop)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        dm.backbone(**x)
    hook.remove()
    with torch.no_grad():
        dm.backbone(**x)  # a later raw call of this thread enters and leaves as before
        expected = dm(**x, delta_ids=["a", "b"]).logits
    served: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: served.append(dm(**x, delta_ids=["a", "b"]).logits.detach()), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the routed batch still waits for the interrupted call"
    assert torch.equal(served[0], expected)
    assert dm._traffic._plain == {}


@pytest.mark.parametrize("key", ["delta_ids", "adapter_names"])
def test_delta_ids_given_to_the_backbone_itself_are_refused(key: str) -> None:
    """`model(..., delta_ids=...)` on the backbone (not the DeltaModel): its **kwargs dropped the keyword and every
    row ran with every enabled delta (0.52 off the routed logits, no error)."""
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    x = _inputs(dm.backbone, batch=2)
    with pytest.raises(
        RoutingError, match=rf"{key} reaches the deltas through the DeltaModel: call dm\(\.\.\., {key}="
    ):
        dm.backbone(**x, **{key: ["a", "b"]})
    assert dm._traffic._plain == {}  # refused inside the gate, and left
    with torch.no_grad():
        dm(**x, delta_ids=["a", "b"])


def _switched_while_serving(dm: dt.DeltaModel, x: dict, switches: list, pause: float, sleep: float) -> list:
    """A server thread calls `dm(**x)` while this one runs each switch, `pause` s apart, a slow first layer (`sleep`
    s) widening the window: every output the server saw."""
    slow = dm.backbone.bert.encoder.layer[0].register_forward_hook(lambda *_: time.sleep(sleep))
    seen: list[torch.Tensor] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with torch.no_grad():
                seen.append(dm(**x).logits)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for switch in switches:
            switch()
            time.sleep(pause)
    finally:
        stop.set()
        server.join()
        slow.remove()
    assert len(seen) > 5
    return seen


def test_switching_deltas_while_another_thread_computes_never_gives_half_a_switch() -> None:
    """A server hot-loading a delta (`add`) or switching one (`disable`, `set_active`, `merge`) while another thread
    computed gave that call some layers with the delta and some without (the slow layer widens the window)."""
    dm = _served("lora", "bert", "cls", names=("a",))
    x = _inputs(dm.backbone, batch=2)
    with torch.no_grad():
        dm.disable("a")
        without = dm(**x).logits
        dm.enable("a")
        with_a = dm(**x).logits
    switches = [lambda: dm.disable("a"), lambda: dm.enable("a"), lambda: dm.set_active([])] * 4 + [
        lambda: dm.set_active("a"),
        lambda: dm.add("b", "bitfit", enabled=False),  # attached switched off: outputs stay as they were
        lambda: dm.detach("b"),
    ]
    seen = _switched_while_serving(dm, x, switches, pause=0.006, sleep=0.004)  # each state across a slow layer
    bad = [i for i, out in enumerate(seen) if not (torch.equal(out, with_a) or torch.equal(out, without))]
    assert not bad, f"{len(bad)} of {len(seen)} calls saw half a switch"


def test_loading_a_delta_while_another_thread_computes_is_one_switch(tmp_path: Path) -> None:
    """`load_delta` adds the delta, then loads its tensors: a call of another thread in between ran with the delta
    at its initial values (a soft prompt's random init: 25 of 401 calls neither without the delta nor with it)."""
    _served("prompt", "bert", "cls", names=("p",)).save_delta(tmp_path / "p", "p")
    dm = dt.DeltaModel(make_model("bert"))
    x = _inputs(dm.backbone, batch=2)
    with torch.no_grad():
        without = dm(**x).logits
        dt.load_delta(dm, tmp_path / "p")
        with_p = dm(**x).logits
        dm.detach("p")
    switches = [lambda: dt.load_delta(dm, tmp_path / "p"), lambda: dm.detach("p")] * 15
    seen = _switched_while_serving(dm, x, switches, pause=0.004, sleep=0.002)
    bad = [i for i, out in enumerate(seen) if not (torch.equal(out, with_p) or torch.equal(out, without))]
    assert not bad, f"{len(bad)} of {len(seen)} calls saw a half-loaded delta"


def test_rows_may_combine_several_deltas() -> None:
    model = make_model("bert")
    dm = dt.DeltaModel(model)
    dm.add("lora", dt.METHODS["lora"]())
    dm.add("bias", dt.METHODS["bitfit"]())
    dm.add("adapter", dt.METHODS["adapter"]())
    _perturb(dm)
    inputs = _inputs(model)
    ids = [("lora", "bias"), "adapter", ("lora", "bias", "adapter"), None]
    with torch.no_grad():
        mixed = dm(**inputs, delta_ids=ids).logits
    for i, names in enumerate(ids):
        dm.set_active([] if names is None else [names] if isinstance(names, str) else list(names))
        torch.testing.assert_close(mixed[i], logits(dm, inputs)[i], rtol=0, atol=1e-5)


def test_routing_leaves_the_enabled_deltas_as_they_were() -> None:
    dm = _served("lora", "bert", "cls")
    dm.enable("a")
    inputs = _inputs(dm.backbone)
    before = logits(dm, inputs)
    with torch.no_grad():
        dm(**inputs, delta_ids=["b"] * 4)
    torch.testing.assert_close(logits(dm, inputs), before, rtol=0, atol=0)
    assert all(d.route is None for d in dm.deltas.values())


def test_gradients_reach_only_the_deltas_that_have_rows() -> None:
    dm = _served("lora", "bert", "cls", names=("a", "b", "c"))
    inputs = make_inputs(dm.backbone, batch=4)
    dm(**inputs, delta_ids=["a", "b", "a", None]).loss.backward()
    grads = {
        n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters()) for n, d in dm.deltas.items()
    }
    assert grads == {"a": True, "b": True, "c": False}


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_mixed_batch_is_refused_for_training_with_gradient_checkpointing(reentrant: bool) -> None:
    """Checkpointed layers run again during backward, after the routing ended: reentrant checkpointing gave
    LoRA gradients 7e-4 off (no error), non-reentrant a bare CheckpointError. Inference still routes."""
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    inputs = make_inputs(dm.backbone, batch=2)
    expected = logits(dm, inputs)
    # transformers 5.25 renamed it (the old name warns); the message names the installed release's call
    off = "activation" if hasattr(dm.backbone, "activation_checkpointing_enable") else "gradient"
    getattr(dm.backbone, f"{off}_checkpointing_enable")({"use_reentrant": reentrant})
    dm.train()
    with pytest.raises(
        RoutingError, match=rf"cannot train with gradient checkpointing.*model\.{off}_checkpointing_disable"
    ):
        dm(**inputs, delta_ids=["a", "b"])
    assert all(d.route is None for d in dm.deltas.values())
    with torch.no_grad():  # no backward, nothing recomputed
        dm(**inputs, delta_ids=["a", "b"])
    dm.eval()
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=0)
    getattr(dm.backbone, f"{off}_checkpointing_disable")()
    dm.train()
    dm(**inputs, delta_ids=["a", "b"]).loss.backward()


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3"])
def test_mixed_generate_matches_each_row_generated_alone(method: str) -> None:
    dm = _served(method, "llama", "lm")
    inputs = _inputs(dm.backbone)
    inputs["attention_mask"][:] = 1
    ids = ["a", "b", "b", "a"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = dm.generate(**inputs, delta_ids=ids, **kwargs)
        for i, name in enumerate(ids):
            dm.set_active(name)
            alone = dm.generate(**{k: v[i : i + 1] for k, v in inputs.items()}, **kwargs)
            assert torch.equal(mixed[i : i + 1], alone), (i, name)


def test_mixed_beam_search_widens_each_rows_deltas() -> None:
    dm = _served("lora", "llama", "lm")
    inputs = _inputs(dm.backbone, batch=2)
    inputs["attention_mask"][:] = 1
    kwargs = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = dm.generate(**inputs, delta_ids=["b", "a"], **kwargs)
        dm.set_active("a")
        alone = dm.generate(**{k: v[1:2] for k, v in inputs.items()}, **kwargs)
    assert torch.equal(mixed[1:2], alone)


def test_saved_deltas_served_together_from_one_backbone(tmp_path: Path) -> None:
    source = _served("bitfit", "bert", "cls", names=("x", "y", "z"))
    for n in ("x", "y", "z"):
        source.save_delta(tmp_path / n, n)
    model = make_model("bert")
    base = state(model)
    dm = dt.DeltaModel(model)
    for n in ("x", "y", "z"):
        dt.load_delta(dm, tmp_path / n, n, enabled=False)
    inputs = _inputs(model)
    with torch.no_grad():
        served = dm(**inputs, delta_ids=["z", "x", "y", None]).logits
        source.set_active("z")
        torch.testing.assert_close(served[0], logits(source, inputs)[0], rtol=0, atol=1e-5)
    dm.detach()
    assert same_state(base, state(model))


def test_a_second_delta_with_its_own_head_is_refused_not_served_with_the_wrong_one(tmp_path: Path) -> None:
    # two deltas trained apart, each with its task head (train_head="auto"): rows share the backbone's
    # one head, so loading the second replaced the first's and the first's rows were scored by it
    for i, n in enumerate(("sentiment", "topic")):
        dm = dt.attach(make_model("bert"), dt.LoRAConfig())
        with torch.no_grad():
            dm.backbone.classifier.weight.add_(float(i + 1))
        dm.save_delta(tmp_path / n)
    served = dt.load_delta(make_model("bert"), tmp_path / "sentiment", "sentiment", enabled=False)
    head = served.backbone.classifier.weight.clone()
    with pytest.raises(dt.DeltaIOError, match="carries its own task head, but delta 'sentiment' brought another"):
        dt.load_delta(served, tmp_path / "topic", "topic", enabled=False)
    assert list(served.deltas) == ["sentiment"] and torch.equal(served.backbone.classifier.weight, head)
    dt.load_delta(served, tmp_path / "topic", "topic", enabled=False, head=False)  # one head for both: said so
    dt.load_delta(served, tmp_path / "sentiment", "again", enabled=False)  # the same head again is no conflict


def test_loading_a_delta_with_its_own_head_keeps_a_head_trained_here(tmp_path: Path) -> None:
    # a delta attached and trained in this process (its head with it), then a saved one loaded beside it
    # to serve both: the saved head replaced the one the first delta was trained with, without a word
    saved = dt.attach(make_model("bert"), dt.LoRAConfig())
    with torch.no_grad():
        saved.backbone.classifier.weight.add_(1.0)
    saved.save_delta(tmp_path / "topic")
    dm = dt.attach(make_model("bert"), dt.LoRAConfig(), "sentiment")
    with torch.no_grad():
        dm.backbone.classifier.weight.add_(2.0)  # what training the head here does
    head = dm.backbone.classifier.weight.clone()
    with pytest.raises(dt.DeltaIOError, match="carries its own task head, but delta 'sentiment' brought another"):
        dt.load_delta(dm, tmp_path / "topic", "topic", enabled=False)
    assert list(dm.deltas) == ["sentiment"] and torch.equal(dm.backbone.classifier.weight, head)
    dt.load_delta(dm, tmp_path / "topic", "topic", enabled=False, head=False)
    assert torch.equal(dm.backbone.classifier.weight, head)


# -- deltas that change one parameter: attached together, enabled one at a time -------------------
def test_two_enabled_deltas_on_one_parameter_are_refused_but_disabled_ones_coexist() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["bitfit"](), "a")
    with pytest.raises(dt.DeltaError, match="already claimed by another delta that is enabled.*enabled=False"):
        dm.add("b", dt.METHODS["bitfit"]())
    dm.add("b", dt.METHODS["bitfit"](), enabled=False)
    with pytest.raises(dt.DeltaError, match="'a' and 'b' both reparametrize .* cannot be enabled together"):
        dm.enable("b")
    with pytest.raises(dt.DeltaError, match="cannot be enabled together"):
        dm.set_active(["a", "b"])
    dm.set_active("b")
    assert not dm.delta("a").enabled and dm.delta("b").enabled


def test_detaching_one_of_two_deltas_on_a_parameter_keeps_the_other_working() -> None:
    model = make_model("bert")
    base, inputs = state(model), _inputs(model)
    dm = dt.DeltaModel(model)
    dm.add("a", dt.METHODS["bitfit"]())
    dm.add("b", dt.METHODS["bitfit"](), enabled=False)
    _perturb(dm)
    with_a = logits(dm, inputs)
    dm.detach("b")
    torch.testing.assert_close(logits(dm, inputs), with_a, rtol=0, atol=0)
    dm.detach()
    assert same_state(base, state(model))


# -- clear errors --------------------------------------------------------------------------------
def test_unknown_delta_name_lists_the_attached_ones() -> None:
    dm = _served("lora", "bert", "cls")
    with pytest.raises(KeyError, match="no delta named 'zz'; attached deltas: a, b"):
        dm(**_inputs(dm.backbone), delta_ids=["a", "zz", None, None])


def test_wrong_number_of_ids_is_refused() -> None:
    dm = _served("lora", "bert", "cls")
    with pytest.raises(RoutingError, match="one delta id per row"):
        dm(**_inputs(dm.backbone), delta_ids=["a", "b", None])


def test_a_merged_delta_cannot_be_served_in_a_mixed_batch() -> None:
    dm = _served("lora", "bert", "cls")
    dm.set_active("a")  # a disabled delta cannot be merged (errors.md row 152)
    dm.merge("a")
    with pytest.raises(RoutingError, match="unmerge them before serving a mixed batch"):
        dm(**_inputs(dm.backbone), delta_ids=["a", "b", None, None])


def test_prefix_serves_whole_batches_only() -> None:
    dm = dt.DeltaModel(make_model("bert"))
    dm.add("p", dt.METHODS["prefix"](num_tokens=2))
    inputs = _inputs(dm.backbone)
    with torch.no_grad():
        dm(**inputs, delta_ids=["p"] * 4)
        with pytest.raises(RoutingError, match="prefix.*cannot act on only some rows"):
            dm(**inputs, delta_ids=["p", None, "p", "p"])


def test_prompt_rows_need_exactly_one_prompt_each() -> None:
    dm = _served("prompt", "bert", "cls")
    with pytest.raises(RoutingError, match=r"rows \[1\] .* no prompt"):
        dm(**_inputs(dm.backbone), delta_ids=["a", None, "b", "a"])
    with pytest.raises(RoutingError, match="several prompt"):
        dm(**_inputs(dm.backbone), delta_ids=[("a", "b"), "a", "b", "a"])


def test_two_weight_deltas_on_one_module_cannot_share_a_row() -> None:
    dm = _served("bitfit", "bert", "cls")
    dm.add("ln", dt.METHODS["layernorm"](), enabled=False)
    with pytest.raises(RoutingError, match="cannot share a row"):
        dm(**_inputs(dm.backbone), delta_ids=[("a", "ln"), "b", None, None])


def test_bad_delta_ids_entries_are_refused() -> None:
    dm = _served("lora", "bert", "cls")
    with pytest.raises(RoutingError, match=r"delta_ids\[1\] must be a delta name"):
        dm(**_inputs(dm.backbone), delta_ids=["a", 3, None, None])
    with pytest.raises(RoutingError, match="delta_ids is empty"):
        dm(**_inputs(dm.backbone), delta_ids=[])


@pytest.mark.parametrize(
    ("arch", "method", "targets"),
    [
        ("t5", "selective", "re:.*relative_attention_bias"),
        ("t5", "lora", "re:.*relative_attention_bias"),  # LoRA takes embedding tables too
        ("bart", "selective", "embeddings"),
    ],
)
def test_a_delta_on_a_table_every_row_shares_is_refused_in_a_mixed_batch(arch: str, method: str, targets: str) -> None:
    """T5's relative position table is called with (queries, keys) buckets: a mixed batch read the queries as
    rows and replaced the wrong ones where the length was a multiple of the batch (logits 0.23 off, no error).
    BART's position table failed in index_copy_. Each is refused in one line; a batch of one delta still runs."""
    model = make_model(arch)
    inputs = {k: v for k, v in make_inputs(model, batch=2, seq=8).items() if k != "labels"}
    dm = dt.DeltaModel(model)
    settings = {"last_k": None} if method == "selective" else {}
    dm.add("a", dt.METHODS[method](targets=targets, **settings), enabled=False)
    with torch.no_grad(), pytest.raises(RoutingError, match="is computed once for every row of the batch"):
        dm(**inputs, delta_ids=["a", None])
    with torch.no_grad():
        dm(**inputs, delta_ids=["a", "a"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_half_precision_mixed_batch_is_each_row_alone_bitwise(arch: str, dtype: torch.dtype) -> None:
    """LoRA adds the whole batch's update in one addmm (one rounding); a mixed batch rounded each row's update on
    its own and then added it (two): on a bf16 GPT-2 the logits moved 1e-2 and 8 of 240 greedy tokens changed."""
    model = make_model(arch, "lm").to(dtype)
    dm = dt.DeltaModel(model)
    for name in ("a", "b"):
        dm.add(name, dt.get_config("lora"), enabled=False)
    _perturb(dm)
    inputs = _inputs(model, batch=4)
    ids = ["a", None, "b", "a"]
    with torch.no_grad():
        mixed = dm(**inputs, delta_ids=ids).logits
        for i, name in enumerate(ids):
            dm.set_active([] if name is None else name)
            alone = dm(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
            assert torch.equal(mixed[i : i + 1], alone), (i, float((mixed[i : i + 1] - alone).abs().max()))


def test_detaching_while_another_thread_calls_the_backbone_leaves_no_call_inside() -> None:
    """A raw call that waited at the gate while `detach()` removed it entered after its leaving hook was gone: the
    model counted it inside for good, and the next `add` from another thread waited forever."""
    model = make_model("bert")
    x = _inputs(model, batch=2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with torch.no_grad():
                model(**x)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(20):
            dm = dt.attach(model, "lora")
            traffic = dm._traffic
            dm.detach()
            time.sleep(0.002)
    finally:
        stop.set()
        server.join(timeout=30)
    assert traffic._plain == {}


def test_two_threads_routing_inside_their_own_calls_are_refused_not_deadlocked() -> None:
    """A hook (or LogitsProcessor) that routes a batch inside a call of the model, in two threads at once: each
    waited for the other's call to end, forever. One of them is now refused; alone, it still runs."""
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    x = _inputs(dm.backbone, batch=2)
    inner = threading.local()

    def hook(*_: object) -> None:
        if not getattr(inner, "busy", False):
            inner.busy = True
            try:
                dm(**x, delta_ids=["a", "b"])
            finally:
                inner.busy = False

    handle = dm.backbone.bert.encoder.layer[0].register_forward_hook(hook)
    outcomes: list[str] = []

    def serve() -> None:
        for _ in range(20):
            try:
                with torch.no_grad():
                    dm(**x)
                outcomes.append("ran")
            except dt.DeltaError as err:
                assert "inside a call of this model" in str(err)
                outcomes.append("refused")

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    handle.remove()
    assert not any(t.is_alive() for t in threads) and len(outcomes) == 40


def test_a_raw_seq2seq_generate_beside_routed_batches_gets_its_own_rows() -> None:
    """`generate` calls a T5's encoder past the top model's call: gated only at the top, it ran with another
    thread's routed rows (222 of 300 outputs wrong). Every transformers model inside the backbone is gated."""
    dm = _served("lora", "t5", "lm", names=("a", "b"))
    dm.set_active("a")
    x = {k: v for k, v in _inputs(dm.backbone, batch=2).items() if k != "decoder_input_ids"}
    routed = _inputs(dm.backbone, batch=2)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        expected = torch.stack(dm.backbone.generate(**x, **kwargs).scores)
    stop, wrong = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            with torch.no_grad():
                dm(**routed, delta_ids=["b", None])

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(60):
            with torch.no_grad():
                got = torch.stack(dm.backbone.generate(**x, **kwargs).scores)
            wrong += [] if torch.equal(got, expected) else [float((got - expected).abs().max())]
    finally:
        stop.set()
        server.join(timeout=30)
    assert not wrong, f"{len(wrong)} of 60 raw generates ran with the other thread's rows"


def test_a_copy_taken_inside_a_routed_batch_is_idle() -> None:
    """`copy.deepcopy` inside `with dm.route(...)` (or beside another thread's batch) kept that batch's rows on the
    copy's deltas: its plain calls ran routed (40 of 40 copies wrong, no error)."""
    dm = _served("lora", "bert", "cls", names=("a", "b"))
    dm.set_active("a")
    x = _inputs(dm.backbone, batch=2)
    with torch.no_grad():
        plain = dm(**x).logits
        with dm.route(["b", None]):
            twin, backbone = copy.deepcopy(dm), copy.deepcopy(dm.backbone)
        assert all(d.route is None for d in twin.deltas.values())
        assert torch.equal(twin(**x).logits, plain) and torch.equal(backbone(**x).logits, plain)
