"""Every registered method on every tiny architecture, checked end to end through the public API only.

    python scripts/check_methods.py            # prints a table, exits 1 if any check failed

An independent check beside the test suite (issue 13's "Done when"): it builds its own tiny models
and inputs and uses nothing from tests/, so a helper bug there cannot hide a library bug here. Per
method x architecture x head (a classification head everywhere, the LM head where one exists):

  I  identity at init: the output equals the backbone's exactly (1e-6), where the method declares it
  T  one training step: only the delta's tensors get gradients and change, the backbone is bitwise
     untouched, and the output moves
  S  save/load round trip: the saved delta loaded onto a fresh copy of the backbone gives the same output
  M  merge equals unmerged to 1e-5, and unmerge gives the unmerged output back; or (r) merge is refused
     with a DeltaError that changes nothing, as it must for a method (or settings) that cannot merge
  D  detach hands the backbone back bitwise: same tensor objects, values, requires_grad, no hooks left

A cell lists the checks that passed ("-" where a check does not apply); a failure is printed in
full under the table. Run it on both ends of the transformers range (docs/compat.md).
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import torch
import transformers as tf

import deltatune as dt

VOCAB, LABELS, BATCH, SEQ = 120, 3, 2, 9
ARCHS = {
    "bert": lambda: tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=48,
        pad_token_id=0,
    ),
    "roberta": lambda: tf.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=52,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "distilbert": lambda: tf.DistilBertConfig(
        vocab_size=VOCAB, dim=24, n_layers=2, n_heads=2, hidden_dim=40, max_position_embeddings=48, pad_token_id=0
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=24,
        n_layer=2,
        n_head=2,
        n_positions=48,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": lambda: tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=48,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "t5": lambda: tf.T5Config(
        vocab_size=VOCAB,
        d_model=24,
        d_kv=12,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    "bart": lambda: tf.BartConfig(
        vocab_size=VOCAB,
        d_model=24,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_position_embeddings=48,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
}
# the default size of random_subset (10,000 entries) is more than these tiny models' targets hold
# and lowrank_adapter merges only with non_linearity="identity": both forms get a row
SETTINGS = {"random_subset": {"count": 1000}, "lowrank_adapter:identity": {"non_linearity": "identity"}}
HEADS = {"gpt2": ("cls", "lm"), "llama": ("cls", "lm"), "t5": ("cls", "lm"), "bart": ("cls", "lm")}


def backbone(arch: str, head: str) -> torch.nn.Module:
    """The same random weights every call (seeded), in eval mode so outputs compare call to call."""
    config = ARCHS[arch]()
    config.num_labels = LABELS
    torch.manual_seed(1234)
    if head == "cls":
        auto = tf.AutoModelForSequenceClassification
    else:
        auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    return auto.from_config(config).eval()


def batch(model: torch.nn.Module, head: str) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded by three; encoder-decoders end each row with eos (their cls heads need it)."""
    c = model.config
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((SEQ, SEQ - 3)):
        if c.is_encoder_decoder:
            ids[row, length - 1] = c.eos_token_id
        ids[row, length:] = c.pad_token_id
        mask[row, length:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if head == "cls":
        out["labels"] = torch.tensor([0, 2])
    elif c.is_encoder_decoder:
        out["labels"] = torch.randint(3, VOCAB, (BATCH, 4), generator=g)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.detach().clone()


def snapshot(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor, bool]]:
    return {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()} | {
        f"buffer:{n}": (id(b), b.detach().clone(), False) for n, b in model.named_buffers()
    }


def hook_count(model: torch.nn.Module) -> int:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return sum(len(getattr(m, n, {})) for m in model.modules() for n in names)


def bitwise_same(a: dict, b: dict, flags: bool = True) -> str | None:
    if a.keys() != b.keys():
        return f"tensor names differ: {sorted(a.keys() ^ b.keys())[:3]}"
    for n, (ident, value, grad) in a.items():
        ident2, value2, grad2 = b[n]
        if ident != ident2:
            return f"{n} is another tensor object"
        if value.dtype != value2.dtype or not torch.equal(value, value2):
            return f"{n} changed (max |diff| {(value.float() - value2.float()).abs().max().item():.3g})"
        if flags and grad != grad2:
            return f"{n} requires_grad {grad2}, was {grad}"
    return None


def close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    if diff > atol:
        raise AssertionError(f"{what}: max |diff| {diff:.3g} > {atol:g}")


def check(method: str, arch: str, head: str, folder: Path) -> tuple[str, list[str]]:
    """The checks that passed ('ITSMD' letters, '-' for not applicable) and the failures' messages."""
    config_cls = dt.METHODS[method.split(":")[0]]
    done, failures = "", []

    def run(letter: str, fn) -> bool:  # noqa: ANN001
        nonlocal done
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the sweep
            failures.append(f"{method} {arch}-{head} {letter}: {type(e).__name__}: {e}".splitlines()[0])
            if "-v" in sys.argv:
                traceback.print_exc()
            done += "."
            return False
        done += letter
        return True

    model = backbone(arch, head)
    inputs = batch(model, head)
    before = snapshot(model)
    hooks = hook_count(model)
    plain = output(model, inputs)
    state: dict = {}

    def attach() -> None:
        state["dm"] = dt.attach(model, config_cls(**SETTINGS.get(method, {})), train_head=False)
        if config_cls.identity_at_init:
            close(output(state["dm"], inputs), plain, 1e-6, "output at init vs the backbone's")

    if not run("I" if config_cls.identity_at_init else "-", attach):
        return done + "????", failures
    dm = state["dm"]

    def train() -> None:
        deltas = {f"{n}.{k}": p for n, d in dm.deltas.items() for k, p in d.named_parameters()}
        if not deltas:
            raise AssertionError("the delta has no parameters")
        trainable = [p for p in dm.parameters() if p.requires_grad]
        if {id(p) for p in trainable} != {id(p) for p in deltas.values() if p.is_floating_point()}:
            raise AssertionError("the trainable parameters are not exactly the delta's")
        start = {k: p.detach().clone() for k, p in deltas.items()}
        out0 = output(dm, inputs)
        opt = torch.optim.Adam(trainable, lr=1e-2)
        dm(**inputs).loss.backward()
        opt.step()
        if any(p.grad is not None for p in model.parameters()):
            raise AssertionError("a backbone parameter received a gradient")
        if not any(not torch.equal(start[k], p) for k, p in deltas.items()):
            raise AssertionError("no delta tensor changed")
        # attach froze the backbone on purpose, and a specification method may move a tensor under a
        # parametrization (renamed ...parametrizations.weight.original): compare tensor objects by identity
        now = {id(t): (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        for n, (ident, value, _) in before.items():
            if ident not in now:
                raise AssertionError(f"backbone tensor {n} is gone")
            if not torch.equal(now[ident][1], value):
                raise AssertionError(f"backbone tensor {n} changed in training")
        if torch.equal(output(dm, inputs), out0):
            raise AssertionError("the output did not move after a training step")

    run("T", train)
    trained = output(dm, inputs)
    path = folder / f"{method}-{arch}-{head}"

    def save_load() -> None:
        dm.save_delta(str(path))
        state["dm2"] = dt.load_delta(backbone(arch, head), str(path))
        close(output(state["dm2"], inputs), trained, 1e-6, "loaded delta vs the saved one")

    saved = run("S", save_load)

    def merge() -> None:
        dm2 = state["dm2"]
        try:
            dm2.merge()
        except dt.DeltaError:  # a refusal must be clean: nothing merged, the output unchanged
            if dm2.delta().merged:
                raise AssertionError("merge refused, yet the delta is marked merged") from None
            close(output(dm2, inputs), trained, 0.0, "output after a refused merge")
            state["refused"] = True
            return
        if not config_cls.mergeable:
            raise AssertionError("merged although the method declares itself not mergeable")
        close(output(dm2, inputs), trained, 1e-5, "merged vs unmerged")
        dm2.unmerge()
        close(output(dm2, inputs), trained, 1e-5, "after unmerge vs unmerged")

    if saved and run("M", merge) and state.get("refused"):
        done = done[:-1] + "r"
    elif not saved:
        done += "-"

    def detach() -> None:
        back = dm.detach()
        if back is not model:
            raise AssertionError("detach returned another object than the backbone")
        problem = bitwise_same(before, snapshot(model))
        if problem:
            raise AssertionError(problem)
        if hook_count(model) != hooks:
            raise AssertionError(f"{hook_count(model) - hooks} hook(s) left on the backbone")
        if not torch.equal(output(model, inputs), plain):
            raise AssertionError("the backbone's output differs from before attach")

    run("D", detach)
    return done, failures


def main() -> int:
    cases = [(a, h) for a in ARCHS for h in HEADS.get(a, ("cls",))]
    print(f"transformers {tf.__version__}, torch {torch.__version__}, deltatune {dt.__version__}")
    print(
        "I identity at init, T training step, S save/load, M merge (r: refused cleanly), D detach ('-' n/a, '.' failed)\n"
    )
    width = max(map(len, [*dt.METHODS, *SETTINGS]))
    heads = [f"{a}-{h}" for a, h in cases]
    print(" " * width + " | " + " | ".join(heads))
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [*dt.METHODS, *(row for row in SETTINGS if ":" in row)]:
            cells = []
            for arch, head in cases:
                cell, bad = check(method, arch, head, Path(tmp))
                cells.append(cell.ljust(len(f"{arch}-{head}")))
                failures += bad
            print(method.ljust(width) + " | " + " | ".join(cells), flush=True)
    n = (len(dt.METHODS) + sum(":" in row for row in SETTINGS)) * len(cases)
    failed_cases = {tuple(f.split(" ")[:2]) for f in failures}
    print(f"\n{n - len(failed_cases)} of {n} method x model cases passed every check")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
