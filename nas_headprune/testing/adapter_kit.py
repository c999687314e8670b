"""The space adapter kit: :class:`SpaceAdapterTestCase`, the properties every space adapter must
have (one test method each), and its helpers :func:`adapters_registered` and :func:`output_tensor`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from torch import nn

    from nas_headprune.space import HeadSpace, LayerSpace, Selection, SpaceAdapter


@contextmanager
def adapters_registered(adapters: Sequence[SpaceAdapter]) -> Iterator[None]:
    """For the duration, :func:`nas_headprune.registry.space_adapters` returns ``adapters`` (what
    :func:`~nas_headprune.space.build.build_space` and :func:`~nas_headprune.io.load_pruned` ask), as if
    they were the installed plugins. Not thread-safe: for tests."""
    from nas_headprune import registry

    original = registry.space_adapters
    registry.space_adapters = lambda: list(adapters)
    try:
        yield
    finally:
        registry.space_adapters = original


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, a Hugging Face output's
    ``last_hidden_state``, or the first tensor of a mapping, tuple or list."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    values = list(out.values()) if isinstance(out, Mapping) else list(out)
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise AssertionError(f"cannot find a tensor in the model output {type(out).__name__}")


class SpaceAdapterTestCase:
    """Properties every space adapter must have, checked on a small model of its family.

    Subclass it in your own tests, under a name pytest collects (``Test...``), and provide the model
    and its input; each test method checks one property and raises ``AssertionError`` saying what is
    wrong::

        from nas_headprune.testing import SpaceAdapterTestCase

        class TestMyAttention(SpaceAdapterTestCase):
            adapters = (MyAttentionAdapter(),)     # tried before the installed adapters
            input_size = (3, 32, 32)

            def make_model(self):
                return create_model("my_tiny_vit")     # random weights, small

    Provide:

    * :meth:`make_model`: a fresh model with random weights (built with
      :func:`nas_headprune.models.factory.create_model`, or any model with a ``base_record``, for
      the save/load check);
    * ``input_size`` (a blank image ``(C, H, W)``), or :meth:`example_inputs` (batch 1) and
      :meth:`make_inputs` for models that take something else;
    * ``adapters``: the adapters under test, tried before the installed ones (and made visible to
      :func:`~nas_headprune.io.load_pruned` by :func:`adapters_registered`); empty to test the
      installed adapters as they are.

    Properties (one test method each):

    * :meth:`test_adapters_claim_layers`: the adapters under test claim layers of the model, and
      every coupling slot lies inside its parameter;
    * :meth:`test_masked_equals_pruned`: over random architectures and selections, the masked dense
      model equals the materialised model (``atol``), on both attention paths where the model has
      them (:meth:`set_attention_path`); the masks change the output, and removing them restores
      the model exactly; the dense selection reproduces the model;
    * :meth:`test_analytic_macs_equal_measured`: analytic MACs and parameters equal the counted
      ones exactly, dense and pruned;
    * :meth:`test_scale_folding`: for every attention layer and kind (``qk``, ``v``), materialising
      with reweight scales equals the masked model run with them, or raises a clean
      :class:`~nas_headprune.errors.ArchitectureError` naming the layer (``expected_folds`` pins
      which kinds each adapter must fold);
    * :meth:`test_save_load_roundtrip`: :func:`~nas_headprune.io.save_pruned` then
      :func:`~nas_headprune.io.load_pruned` is bit-exact (weights and outputs).

    The methods take no arguments, so they can also be called directly.
    """

    adapters: ClassVar[Sequence[SpaceAdapter]] = ()
    input_size: ClassVar[tuple[int, ...] | None] = None
    #: random architectures checked by test_masked_equals_pruned (per attention path)
    architectures: ClassVar[int] = 4
    atol: ClassVar[float] = 1e-5
    #: leave layers no adapter can prune dense (``build_space(skip_unsupported=True)``)
    skip_unsupported: ClassVar[bool] = False
    #: ``{adapter name: kinds it must fold}``, e.g. ``{"my_attention": ("qk", "v")}``; ``None``: any
    expected_folds: ClassVar[Mapping[str, Collection[str]] | None] = None
    #: give every bias random values first, so that bias slicing is exercised
    randomize_biases: ClassVar[bool] = True

    # ------------------------------------------------------------------ what a subclass provides
    def make_model(self) -> nn.Module:
        """A fresh model of the family under test, with random weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_model()")

    def example_inputs(self) -> Any:
        """Batch-1 inputs for building the space and counting MACs (see
        :func:`~nas_headprune.evaluator.measure.example_call`); ``None``: a blank image of
        ``input_size``."""
        return None

    def make_inputs(self, generator: torch.Generator) -> Any:
        """Random inputs (batch 2) for comparing outputs; by default images of ``input_size``."""
        if self.input_size is None:
            raise NotImplementedError(f"{type(self).__name__} must set input_size or implement make_inputs()")
        return torch.randn(2, *self.input_size, generator=generator)

    def set_attention_path(self, model: nn.Module, fused: bool) -> bool:
        """Switch ``model`` to its fused or plain attention path; ``False`` when it has one path.

        By default: the ``fused_attn`` flag of timm-style modules, or a Hugging Face model's
        attention implementation (``"sdpa"`` / ``"eager"``).
        """
        found = False
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                setattr(module, "fused_attn", fused)  # noqa: B010 - any module with the flag
                found = True
        switch = getattr(model, "set_attn_implementation", None)
        if not found and callable(switch) and hasattr(model, "config"):
            switch("sdpa" if fused else "eager")
            found = True
        return found

    def run_model(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """``model(inputs)`` (a mapping as keyword arguments, a tuple as positional ones), as one
        tensor (:func:`output_tensor`), without gradients."""
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                out = model(**inputs)
            elif isinstance(inputs, tuple):
                out = model(*inputs)
            else:
                out = model(inputs)
        return output_tensor(out)

    # ------------------------------------------------------------------------------- helpers
    def _all_adapters(self) -> list[SpaceAdapter]:
        from nas_headprune import registry

        return [*self.adapters, *registry.space_adapters()]

    def _model(self, fused: bool | None = None) -> nn.Module:
        model = self.make_model().eval()
        if fused is not None:
            self.set_attention_path(model, fused)
        if self.randomize_biases:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return model

    def _paths(self) -> list[bool | None]:
        return [True, False] if self.set_attention_path(self.make_model(), True) else [None]

    def _space(self, model: nn.Module, adapters: list[SpaceAdapter]) -> HeadSpace:
        from nas_headprune.space.build import build_space

        return build_space(
            model,
            self.input_size,
            example_inputs=self.example_inputs(),
            skip_unsupported=self.skip_unsupported,
            adapters=adapters,
        )

    def _subject_layers(self, space: HeadSpace) -> list[LayerSpace]:
        """The layers claimed by the adapters under test (every layer when none are given)."""
        if not self.adapters:
            return list(space.layers.values())
        return [layer for layer in space.layers.values() if any(layer.adapter is a for a in self.adapters)]

    def _selection(self, space: HeadSpace, seed: int) -> Selection:
        gen = torch.Generator().manual_seed(seed)
        arch = space.sample(seed)
        scores = {label: torch.rand(d.heads, d.max_width, generator=gen) for label, d in space.dims.items()}
        return space.selection_from_scores(scores, arch)

    def _inputs(self, seed: int) -> Any:
        return self.make_inputs(torch.Generator().manual_seed(1000 + seed))

    # -------------------------------------------------------------------------- the properties
    def test_adapters_claim_layers(self) -> None:
        model = self._model()
        space = self._space(model, self._all_adapters())
        layers = self._subject_layers(space)
        names = ", ".join(a.name for a in self.adapters) or "the installed adapters"
        assert layers, f"{names} claim no layer of {type(model).__name__} (skipped: {space.skipped})"
        modules = dict(model.named_modules())
        for layer in layers:
            params = dict(modules[layer.label].named_parameters())
            for kind, slots in layer.adapter.coupling(layer).items():
                d = layer.dims[kind]
                for slot in slots:
                    assert slot.param in params, (
                        f"{layer.label}: coupling names {slot.param!r}, which it lacks"
                    )
                    size = params[slot.param].shape[slot.axis]
                    # the last channel of the last head, by the Slot rule, plus one
                    last = (
                        slot.offset
                        + (d.heads - 1) * slot.head_stride
                        + (d.max_width - 1) * slot.channel_stride
                    )
                    end = last + 1
                    assert end <= size, (
                        f"{layer.label}.{slot.param}: {kind} channels reach index {end - 1} on axis "
                        f"{slot.axis}, which has {size}"
                    )

    def test_masked_equals_pruned(self) -> None:
        from nas_headprune.evaluator.materialize import materialize

        for fused in self._paths():
            model = self._model(fused)
            space = self._space(model, self._all_adapters())
            where = f"{type(model).__name__} ({'fused' if fused else 'plain' if fused is False else 'one'} attention path)"
            changed = 0.0
            for seed in range(self.architectures):
                selection = self._selection(space, seed)
                inputs = self._inputs(seed)
                plain = self.run_model(model, inputs)
                with space.apply_masks(model, space.masks_from_selection(selection)):
                    masked = self.run_model(model, inputs)
                again = self.run_model(model, inputs)
                assert torch.equal(plain, again), f"{where}: the model differs after its masks were removed"
                pruned = materialize(model, space, selection).eval()
                out = self.run_model(pruned, inputs)
                err = (masked - out).abs().max().item()
                assert err < self.atol, (
                    f"{where}: pruned model differs from the masked one by {err:.3g} "
                    f"(architecture {selection.architecture().to_dict()})"
                )
                changed = max(changed, (masked - plain).abs().max().item())
            assert changed > 100 * self.atol, (
                f"{where}: masking random architectures changed the output by {changed:.3g} at most; "
                "the check cannot see the pruned layers (a layer scale near 0?)"
            )
            dense = materialize(model, space, space.first_channels(space.dense())).eval()
            inputs = self._inputs(0)
            err = (self.run_model(dense, inputs) - self.run_model(model, inputs)).abs().max().item()
            assert err < self.atol, (
                f"{where}: materialising the dense selection changes the output by {err:.3g}"
            )

    def test_analytic_macs_equal_measured(self) -> None:
        from nas_headprune.evaluator.cost import analytic_cost
        from nas_headprune.evaluator.materialize import materialize
        from nas_headprune.evaluator.measure import count_params, measure_macs

        model = self._model()
        space = self._space(model, self._all_adapters())
        kwargs = {"example_inputs": self.example_inputs()}
        dense = analytic_cost(space)
        counted = measure_macs(model, self.input_size, **kwargs)
        assert dense.macs == counted, f"dense: analytic MACs {dense.macs} != counted {counted}"
        assert dense.params == count_params(model), (
            f"dense: analytic params {dense.params} != {count_params(model)}"
        )
        for seed in range(2):
            selection = self._selection(space, seed)
            arch = selection.architecture()
            pruned = materialize(model, space, selection)
            cost = analytic_cost(space, arch)
            counted = measure_macs(pruned, self.input_size, **kwargs)
            assert cost.macs == counted, (
                f"pruned: analytic MACs {cost.macs} != counted {counted} (architecture {arch.to_dict()})"
            )
            n = count_params(pruned)
            assert cost.params == n, (
                f"pruned: analytic params {cost.params} != {n} (architecture {arch.to_dict()})"
            )

    def test_scale_folding(self) -> None:
        from nas_headprune.errors import ArchitectureError
        from nas_headprune.evaluator.materialize import materialize
        from nas_headprune.space import QUERY_SCALE

        model = self._model()
        space = self._space(model, self._all_adapters())
        selection = self._selection(space, 0)
        inputs = self._inputs(0)
        plain = self.run_model(materialize(model, space, selection).eval(), inputs)
        folded: dict[str, set[str]] = {}
        moved = 0.0  # the largest effect of folded scales on the output
        for layer in self._subject_layers(space):
            if layer.kind != "attention":
                continue
            folded.setdefault(layer.adapter.name, {"qk", "v"})
            for kind in ("qk", "v"):
                d = layer.dims[kind]
                gen = torch.Generator().manual_seed(len(d.label))
                scale = 0.5 + torch.rand(d.heads, d.max_width, generator=gen)
                try:
                    pruned = materialize(model, space, selection, scales={d.label: scale}).eval()
                except ArchitectureError as exc:
                    assert layer.label in str(exc), (
                        f"{d.label}: the folding error does not name the layer: {exc}"
                    )
                    folded[layer.adapter.name].discard(kind)
                    continue
                masks = space.masks_from_selection(selection)
                if kind == "qk":
                    masks[d.label + QUERY_SCALE] = scale
                else:
                    masks[d.label] = masks[d.label] * scale
                with space.apply_masks(model, masks):
                    expected = self.run_model(model, inputs)
                out = self.run_model(pruned, inputs)
                err = (expected - out).abs().max().item()
                assert err < self.atol, f"{d.label}: folded scales differ from the masked model by {err:.3g}"
                moved = max(moved, (out - plain).abs().max().item())
        if any(folded.values()):
            # query scales may barely move a near-uniform softmax of a random model; values do
            assert moved > 10 * self.atol, f"folded scales changed the output by {moved:.3g} at most"
        if self.expected_folds is not None:
            got = {name: sorted(kinds) for name, kinds in folded.items()}
            want = {name: sorted(kinds) for name, kinds in self.expected_folds.items()}
            assert got == want, f"folded kinds {got}, expected {want}"

    def test_save_load_roundtrip(self) -> None:
        from nas_headprune.errors import UsageError
        from nas_headprune.evaluator.materialize import materialize
        from nas_headprune.io import load_pruned, save_pruned

        model = self._model()
        adapters = self._all_adapters()
        space = self._space(model, adapters)
        pruned = materialize(model, space, self._selection(space, 1)).eval()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                save_pruned(pruned, tmp)
            except UsageError as exc:
                raise AssertionError(f"save_pruned refused the model: {exc}") from exc
            with adapters_registered(adapters):
                loaded = load_pruned(tmp).eval()
        a, b = pruned.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys(), f"loaded model's parameters differ: {sorted(set(a) ^ set(b))[:5]}"
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert not changed, f"loaded weights differ: {changed[:5]}"
        inputs = self._inputs(1)
        assert torch.equal(self.run_model(pruned, inputs), self.run_model(loaded, inputs)), (
            "the loaded model computes something else"
        )
