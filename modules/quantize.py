"""Post-training int8 quantization for CPU inference, saved as a ``torch.export`` program (``.pt2``) that loads back
without Lightning or this repository's classes.

Two paths, one per kind of model, both on the current PyTorch stack (torchao; not ``torch.ao.quantization``'s eager
API, which is deprecated):

* image classifiers (convolutions): PT2E static quantization. The model is captured with ``torch.export``, the
  X86 inductor quantizer marks convolutions and linear layers (int8 weights per output channel, int8 activations per
  tensor; the first convolution and the head stay float), a few batches of the run's own data calibrate the
  activation ranges, and ``convert_pt2e`` folds the weights to int8. The saved program holds quantize/dequantize
  ops around float convolutions (the portable reference form); :func:`load_int8` lowers it to oneDNN's fused int8
  convolutions (``lower=True``), which is what makes it fast on an x86 CPU.
* text classifiers (linear layers): torchao's ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig`` (int8
  weights per output channel, activations quantized per token at run time, int8 matmuls ``aten._int_mm``); the
  embeddings, LayerNorms and the attention softmax stay in float. No calibration is needed.

Extractive QA and masked-LM models are refused with one line (their outputs are per token and their accuracy check
would need their own metrics).

Loading: ``model = load_int8("export/model_int8.pt2")``; then ``model(images)`` (``(B, 3, H, W)`` in [0, 1],
normalization inside) or ``model(tokenizer(texts, padding=True, return_tensors="pt"))``, returning logits.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

INT8_FILE = "model_int8.pt2"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# torchao's pytree warnings are filtered for every run in modules/__init__.py.


@contextmanager
def _quiet_archive():
    """torch 2.14's ``torch.export`` archive warns that "no complete tensor" was found when tensors share a storage
    (a quantized weight and its scale): harmless on the CPU, where the program runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No complete tensor found in the group")
        yield


def import_torchao() -> None:
    """Import torchao's quantization APIs (and the custom ops a saved text program calls)."""
    import torchao.quantization  # noqa: F401
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401


def int8_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be quantized here (one line), or None when it can."""
    from modules.image_classifier import ImageClassifier
    from modules.text_classifier import TextClassifier

    if isinstance(model, ImageClassifier | TextClassifier):
        return None
    return (
        f"int8 quantization supports the image and text classifiers; {type(model).__name__} is not one (QA and "
        "masked-LM outputs are per token and have no accuracy check here): export it without --quantize"
    )


def quantize_int8(model: nn.Module, calibration: Iterable) -> torch.export.ExportedProgram:
    """The int8 program of a classifier in eval mode (``model`` itself is left unchanged).

    Args:
        model: an ``ImageClassifier`` or ``TextClassifier``.
        calibration: model inputs (image batches in [0, 1], or tokenized text batches): image models calibrate
            their activation ranges on all of them; text models only trace with the first.
    """
    from modules.image_classifier import ImageClassifier

    reason = int8_refusal(model)
    if reason:
        raise ValueError(reason)
    import_torchao()
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        if isinstance(model, ImageClassifier):
            return _static_pt2e(model, list(calibration))
        return _dynamic_linear(model, next(iter(calibration)))


def _static_pt2e(model: nn.Module, batches: list[torch.Tensor]) -> torch.export.ExportedProgram:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    if not batches:
        raise ValueError("int8 quantization of an image model needs at least one calibration batch")
    example = (batches[0][:2].clone(),)  # torch.export.save keeps the example (its whole storage): two images
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    # strict=True (TorchDynamo): the quantizer finds convolutions by the module or function each node came from,
    # which the non-strict export records only for exact nn.Conv2d modules (EfficientNet-Lite pads in a subclass).
    graph = torch.export.export(model, example, dynamic_shapes=shapes, strict=True).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    for name in _kept_in_float(model):
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(graph, quantizer)
    for images in batches:
        prepared(images)
    converted = _drop_unused_tensors(convert_pt2e(prepared))
    return torch.export.export(converted, example, dynamic_shapes=shapes)


def _kept_in_float(model: nn.Module) -> list[str]:
    """The first convolution (it sees the normalized pixels, whose range one int8 scale covers badly) and the head:
    measured on the digits run (EfficientNet-Lite0, 360 test images), quantizing them too cost 0.3-0.6 more points of
    test accuracy, for 13 KB less."""
    first_conv = next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))
    return [first_conv, "head"]


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the float weights ``convert_pt2e`` leaves behind once their int8 copies are folded in (the saved
    program would carry both: larger than the float model)."""
    graph.graph.eliminate_dead_code()
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner), attr)
    graph.recompile()
    return graph


class TokenInputs(nn.Module):
    """A text classifier called with the tokenizer's tensors as keyword arguments (what ``torch.export`` traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids})


def _dynamic_linear(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())  # every nn.Linear: encoder and head
    inputs = {name: tensor[:2].clone() for name, tensor in _text_inputs(batch).items()}  # saved in the file
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    seq_dim = torch.export.Dim("seq", min=2, max=_max_positions(model))
    shapes = {name: {0: batch_dim, 1: seq_dim} for name in TEXT_INPUTS}
    return torch.export.export(TokenInputs(model), (), inputs, dynamic_shapes=shapes)


def _max_positions(model: nn.Module) -> int:
    return int(getattr(getattr(model.backbone, "config", None), "max_position_embeddings", 512))


def _text_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three tensors the saved text program takes; token types default to zeros, as in BERT."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    types = batch.get("token_type_ids")
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids) if mask is None else mask,
        "token_type_ids": torch.zeros_like(ids) if types is None else types,
    }


class Int8Model(nn.Module):
    """A loaded int8 program, called like the Lightning model: ``model(images)`` or ``model(tokenized)`` -> logits."""

    def __init__(self, program: nn.Module, text: bool):
        super().__init__()
        self.program, self.text = program, text

    def train(self, mode: bool = True) -> Int8Model:
        self.training = mode  # an exported program has no train mode: it always runs as traced (eval)
        return self

    def forward(self, inputs):
        if self.text:
            return self.program(**_text_inputs(inputs))
        return self.program(inputs)


def save_int8(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Write ``program`` with ``torch.export.save``; returns the path."""
    path = Path(path)
    with _quiet_archive():
        torch.export.save(program, str(path))
    return path


def load_int8(path: str | Path, lower: bool = True) -> Int8Model:
    """Load a program written by :func:`save_int8`.

    Args:
        path: the ``.pt2`` file.
        lower: image programs only: replace the quantize/dequantize + float convolution patterns with oneDNN's fused
            int8 kernels (about 10-30 s once, on a 2-core CPU); False runs the reference form, which is exact but
            slower than the float model.
    """
    import_torchao()  # the text programs call torchao's quantization ops
    with _quiet_archive():
        program = torch.export.load(str(path))
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    text = "input_ids" in names
    lowered = lower and not text
    return Int8Model(
        _lower_to_onednn(program, _example_images(program, names[0])) if lowered else program.module(), text
    )


def _example_images(program: torch.export.ExportedProgram, name: str) -> torch.Tensor:
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    shape = [d if isinstance(d, int) else 2 for d in node.meta["val"].shape]  # the batch is symbolic
    return torch.rand(shape)


def _lower_to_onednn(program: torch.export.ExportedProgram, example: torch.Tensor) -> nn.Module:
    """What torchao's ``lower_pt2e_quantized_to_x86`` does, on the loaded program (no second capture, and the batch
    dimension stays dynamic where torchao's fixes it to the example's): the quantize/dequantize + convolution patterns
    replaced by oneDNN int8 kernels, and their weights prepacked once."""
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    decompositions = {
        op: fn for op, fn in torch.export.default_decompositions().items() if torch._export.utils._is_cia_op(op)
    }
    with torch.no_grad():
        graph = program.run_decompositions(decompositions).module()
        for node in list(graph.graph.nodes):  # the fusion patterns expect permute, not t, before a linear
            if node.target == torch.ops.aten.t.default:
                with graph.graph.inserting_before(node):
                    permute = graph.graph.call_function(torch.ops.aten.permute.default, (node.args[0], [1, 0]))
                node.replace_all_uses_with(permute)
                graph.graph.erase_node(node)
        graph.recompile()
        freezing_passes(graph, (example,))
        constant_fold(graph)
    return graph


@torch.no_grad()
def accuracy(model, batches: Iterable[tuple], multi_label: bool = False) -> tuple[float, int]:
    """Accuracy of ``model`` (inputs -> logits) over ``(inputs, labels)`` pairs, and the number of samples; for
    multi-label models, the mean share of a sample's labels decided right at probability 0.5."""
    right, total = 0, 0
    for inputs, labels in batches:
        logits = model(inputs)
        if multi_label:
            right += ((logits > 0) == labels.bool()).float().mean(-1).sum().item()
        else:
            right += (logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return right / max(total, 1), total
