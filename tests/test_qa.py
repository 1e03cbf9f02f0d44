"""Extractive QA: windows and offsets on handwritten text, span decoding, EM/F1 against hand-computed values, bad
SQuAD input, prediction on raw strings, and EM/F1 under 2-process DDP equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer
from transformers import AutoTokenizer

from datamodules.squad import QAExample, SquadDataModule, make_windows, parse_squad, read_squad
from datamodules.tokenizers import minilm_path
from modules.qa import ExtractiveQA, decode_answers, span_candidates, squad_scores

FILLER = (
    "The river runs north past old mills and quiet farms, and the valley widens where the hills fall away. "
    "Traders came by boat each spring to buy wool, grain and timber from the villages along its banks. "
)
CONTEXT = FILLER * 3 + "The tower was finished in 1889 by Gustave Eiffel for the World Fair. " + FILLER * 2


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


def squad_json(articles: dict[str, list[tuple[str, str, str | None]]]) -> dict:
    """A SQuAD v2.0 object: title -> [(context, question, answer text or None for impossible)]."""
    data = []
    for title, items in articles.items():
        paragraphs = []
        for n, (context, question, answer) in enumerate(items):
            qa = {"id": f"{title}-{n}", "question": question, "is_impossible": answer is None, "answers": []}
            if answer is not None:
                qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
            paragraphs.append({"context": context, "qas": [qa]})
        data.append({"title": title, "paragraphs": paragraphs})
    return {"version": "v2.0", "data": data}


def test_long_context_becomes_overlapping_windows_and_the_answer_decodes(tokenizer) -> None:
    answer = {"text": "Gustave Eiffel", "answer_start": CONTEXT.index("Gustave Eiffel")}
    windows = make_windows(tokenizer, ["Who built the tower?"], [CONTEXT], 64, 16, 16, answers=[answer])
    assert len(windows) > 3 and {w["example_index"] for w in windows} == {0}
    holding = [w for w in windows if w["start_positions"] > 0]
    assert holding, "no window holds the answer"
    for w in windows:
        assert len(w["input_ids"]) <= 64
        context_offsets = [o for o in w["offsets"] if o[0] >= 0]
        span = (context_offsets[0][0], context_offsets[-1][1])
        inside = span[0] <= answer["answer_start"] and answer["answer_start"] + len(answer["text"]) <= span[1]
        assert (w["start_positions"] > 0) == inside  # a window without the whole answer points at CLS
    for w in holding:
        start, end = w["start_positions"], w["end_positions"]
        assert CONTEXT[w["offsets"][start][0] : w["offsets"][end][1]] == "Gustave Eiffel"
        tokens = tokenizer.convert_ids_to_tokens(w["input_ids"][start : end + 1])
        assert tokens == ["gustave", "e", "##iff", "##el"]
    # Consecutive windows share 16 context tokens, so every context token is covered.
    covered = {o for w in windows for o in w["offsets"] if o[0] >= 0}
    assert len(covered) == len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])


def test_window_settings_that_cannot_fit_are_an_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="doc_stride is 128 but must be below the context room of a window, 61"):
        make_windows(tokenizer, ["q?"], [CONTEXT], 128, 128, 64)


def _offsets(count: int, length: int) -> torch.Tensor:
    """Offsets of a window: CLS + 3 question tokens + ``count`` context tokens (5 characters each) + SEP + pad."""
    offsets = torch.full((1, length, 2), -1)
    for i in range(count):
        offsets[0, 4 + i] = torch.tensor([5 * i, 5 * i + 4])
    return offsets


def test_decoding_picks_the_best_valid_span_within_max_length() -> None:
    context = "aaaa bbbb cccc dddd eeee ffff gggg hhhh"  # context tokens at positions 4 to 11
    offsets = torch.cat([_offsets(8, 14), _offsets(8, 14)])
    start, end = torch.zeros(2, 14), torch.zeros(2, 14)
    start[:, 1], end[:, 1] = 50.0, 50.0  # a question token: never part of an answer
    start[:, 6], end[:, 7] = 6.0, 5.0  # "cccc dddd" scores 11
    start[0, 10], end[0, 5] = 9.0, 9.0  # window 0: end before start, invalid (each alone scores 9)
    start[1, 4], end[1, 11] = 8.0, 8.5  # window 1: "aaaa".."hhhh", 8 tokens, scores 16.5 but is too long for 3
    candidates = span_candidates(start, end, offsets, n_best=5, max_answer_length=3)
    assert candidates["scores"][:, 0].tolist() == [11.0, 11.0]
    assert candidates["spans"][:, 0].tolist() == [[10, 19], [10, 19]]
    examples = [QAExample("q0", "?", context), QAExample("q1", "?", context)]
    decoded = decode_answers(candidates | {"example_index": torch.tensor([0, 1])}, examples, version_2=False)
    assert decoded["q0"]["answer"] == decoded["q1"]["answer"] == "cccc dddd" and decoded["q0"]["start"] == 10
    longer = span_candidates(start, end, offsets, n_best=5, max_answer_length=8)
    decoded = decode_answers(longer | {"example_index": torch.tensor([0, 1])}, examples, version_2=False)
    assert decoded["q0"]["answer"] == "cccc dddd" and decoded["q1"]["answer"] == context


def test_null_threshold_and_best_span_over_windows() -> None:
    context = "aaaa bbbb cccc dddd eeee ffff gggg hhhh"
    offsets = torch.cat([_offsets(8, 14), _offsets(8, 14)])
    start, end = torch.zeros(2, 14), torch.zeros(2, 14)
    start[0, 5], end[0, 5] = 2.0, 2.0  # window 0: "bbbb" scores 4
    start[1, 8], end[1, 9] = 3.0, 3.0  # window 1: "eeee ffff" scores 6, the best
    start[:, 0], end[:, 0] = torch.tensor([4.0, 3.5]), torch.tensor([4.0, 3.5])  # null scores 8 and 7: min 7
    candidates = span_candidates(start, end, offsets) | {"example_index": torch.tensor([0, 0])}
    ex = [QAExample("q", "?", context)]
    assert decode_answers(candidates, ex, version_2=False)["q"]["answer"] == "eeee ffff"
    assert decode_answers(candidates, ex, version_2=True, null_threshold=0.0)["q"]["answer"] == ""  # 7 - 6 > 0
    assert decode_answers(candidates, ex, version_2=True, null_threshold=1.5)["q"]["answer"] == "eeee ffff"


def test_em_f1_equal_hand_computed_values() -> None:
    examples = [
        QAExample("q1", "?", "", [{"text": "Eiffel Tower", "answer_start": 0}]),
        QAExample("q2", "?", "", [{"text": "1889", "answer_start": 0}, {"text": "1889 AD", "answer_start": 0}]),
        QAExample("q3", "?", "", []),
        QAExample("q4", "?", "", []),
    ]
    preds = {"q1": "the Eiffel tower!", "q2": "in 1889", "q3": "", "q4": "Paris"}
    scores = squad_scores(preds, examples, version_2=True)
    # q1: EM 1 (articles, case, punctuation normalized). q2: EM 0; F1 vs "1889": p 1/2, r 1 -> 2/3, vs "1889 AD":
    # p 1/2, r 1/2 -> 1/2; the max, 2/3. q3: empty for an impossible question, 1. q4: an answer to one, 0.
    assert scores["em"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert scores["has_ans_em"] == pytest.approx(50.0) and scores["has_ans_f1"] == pytest.approx(100 * (5 / 3) / 2)
    assert scores["no_ans_em"] == scores["no_ans_f1"] == pytest.approx(50.0)
    assert scores["questions"] == 4
    v1 = squad_scores(preds, examples[:2], version_2=False)
    assert set(v1) == {"em", "f1", "questions"} and v1["em"] == pytest.approx(50.0)


def test_bad_squad_input(tmp_path: Path) -> None:
    good = squad_json({"A": [(CONTEXT, "Who built the tower?", "Gustave Eiffel")]})
    with pytest.raises(ValueError, match="not a SQuAD file"):
        parse_squad({"articles": []}, "f.json", True)
    missing = json.loads(json.dumps(good))
    del missing["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(ValueError, match=r"f\.json: question 'A-0' has no 'question' field"):
        parse_squad(missing, "f.json", True)
    no_context = json.loads(json.dumps(good))
    del no_context["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(ValueError, match="article 'A' paragraph 0 has no 'context' field"):
        parse_squad(no_context, "f.json", True)
    no_answers = json.loads(json.dumps(good))
    del no_answers["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    with pytest.raises(ValueError, match="question 'A-0' has no 'answers' field"):
        parse_squad(no_answers, "f.json", True)

    shifted = json.loads(json.dumps(good))
    shifted["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    empty = squad_json({"B": [("   ", "Who?", None), (CONTEXT, " ", None)]})
    with pytest.warns(UserWarning, match="skipped 1 training question.*answer_start does not point"):
        assert parse_squad(shifted, "f.json", training=True) == []
    kept = parse_squad(shifted, "f.json", training=False)  # evaluation compares texts: kept
    assert [e.id for e in kept] == ["A-0"]
    with pytest.warns(UserWarning, match="skipped 2 question.*empty question or context"):
        assert parse_squad(empty, "f.json", training=True) == []
    (tmp_path / "broken.json").write_text('{"data": [\n{"title": }')
    with pytest.raises(ValueError, match="broken.json line 2: not valid JSON"):
        read_squad(tmp_path / "broken.json")


@pytest.fixture
def squad_dir(tmp_path: Path) -> Path:
    capital = "Paris is the capital of France. It lies on the Seine. " * 2
    articles = {
        "One": [(capital, "What is the capital of France?", "Paris"), (capital, "What river?", "Seine")],
        "Two": [(CONTEXT, "Who built the tower?", "Gustave Eiffel"), (CONTEXT, "Who sang?", None)],
        "Three": [(CONTEXT, "When was the tower finished?", "1889"), (capital, "Where is Rome?", None)],
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad_json(articles)))
    return tmp_path


def _squad_data(root: Path, **kwargs) -> SquadDataModule:
    options = dict(train_file="squad.json", val_file=None, tokenizer="bert-tiny", max_length=48, doc_stride=8)
    options["cache_dir"] = str(root / "cache")
    return SquadDataModule(str(root), **(options | {"max_query_length": 16, "batch_size": 4} | kwargs))


def test_holdout_articles_and_answerable_only(squad_dir: Path) -> None:
    dm = _squad_data(squad_dir, holdout_articles=["Two"])
    dm.setup("fit")
    assert [e.id for e in dm.examples("val")] == ["Two-0", "Two-1"] and dm.examples("test") == dm.examples("val")
    assert {e.title for e in dm.datasets["train"].examples} == {"One", "Three"} and dm.version_2_with_negative
    dm = _squad_data(squad_dir, answerable_only=True)
    dm.setup("fit")
    assert [e.id for e in dm.examples("val")] == ["Three-0"] and not dm.version_2_with_negative
    with pytest.raises(ValueError, match=r"names \['Four'\], which are not training articles of .*squad.json"):
        _squad_data(squad_dir, holdout_articles=["Four"]).setup("fit")


def test_prepare_data_makes_the_windows_and_a_fresh_setup_only_loads(squad_dir: Path, tokenizer, monkeypatch) -> None:
    from tests.test_text_classification import refuse_to_tokenize

    prepared = _squad_data(squad_dir, holdout_articles=["Two"], test_articles=["Three"])
    prepared.prepare_data()  # Lightning: local rank 0 of each node
    assert prepared.tokenized == 3 and len(list((squad_dir / "cache").glob("*"))) == 3  # no temporary file left
    assert not hasattr(prepared, "datasets") and not hasattr(prepared, "tokenizer")  # setup relies on none of it
    with monkeypatch.context() as patch:  # another rank: a fresh object that only runs setup
        refuse_to_tokenize(patch)
        rank1 = _squad_data(squad_dir, holdout_articles=["Two"], test_articles=["Three"])
        rank1.setup("fit")
        batches = list(rank1.train_dataloader())
    assert rank1.cache_hits == 3 and rank1.tokenized == 0
    assert [e.id for e in rank1.examples("test")] == ["Three-0", "Three-1"] and rank1.version_2_with_negative
    # The loaded windows are those make_windows gives.
    examples = rank1.examples("val")
    answers = [e.answers[0] if e.answers else None for e in examples]
    questions, contexts = [e.question for e in examples], [e.context for e in examples]
    made = make_windows(tokenizer, questions, contexts, 48, 8, 16, answers)
    loaded = [rank1.datasets["val"][i] for i in range(len(rank1.datasets["val"]))]
    assert len(loaded) == len(made) > 2
    for i, (window, expected) in enumerate(zip(loaded, made, strict=True)):
        assert window.pop("window_index") == i
        assert [tuple(o) for o in window.pop("offsets").tolist()] == expected.pop("offsets")
        assert window == expected
    assert sum(len(b["example_index"]) for b in batches) == len(rank1.datasets["train"])
    alone = _squad_data(squad_dir, holdout_articles=["Two"], test_articles=["Three"], cache_dir=str(squad_dir / "c2"))
    alone.setup("fit")  # setup alone, on an empty cache
    assert alone.tokenized == 3 and alone.cache_hits == 0
    for split in ("train", "val", "test"):
        assert len(alone.datasets[split]) == len(rank1.datasets[split])
        assert alone.datasets[split][0]["input_ids"] == rank1.datasets[split][0]["input_ids"]
    edit = {"One": [(CONTEXT, "Who built it?", "Gustave Eiffel")], "Two": [(CONTEXT, "When?", None)]}
    (squad_dir / "squad.json").write_text(json.dumps(squad_json(edit)))
    edited = _squad_data(squad_dir)
    edited.prepare_data()
    assert edited.tokenized == 2  # a changed file is another key
    other = _squad_data(squad_dir, max_length=40)
    other.prepare_data()
    assert other.tokenized == 2 and len(list((squad_dir / "cache").glob("qa-*.pt"))) == 7  # other window sizes too


class KeywordQA(ExtractiveQA):
    """Points start and end at every occurrence of one token: deterministic answers without training."""

    def __init__(self, keyword: str, **kwargs):
        super().__init__(**kwargs)
        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.keyword_id = tok.convert_tokens_to_ids(keyword)

    def forward(self, batch):
        start, end = super().forward(batch)
        hit = (batch["input_ids"] == self.keyword_id).float() * 10 + torch.arange(batch["input_ids"].shape[1]) * 1e-3
        return start * 0 + hit, end * 0 + hit


class SaveScores(Callback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_validation_end(self, trainer, pl_module) -> None:
        scores = {k: v.item() for k, v in trainer.callback_metrics.items() if k != "val/loss"}
        (self.folder / f"scores{trainer.world_size}_{trainer.global_rank}.json").write_text(json.dumps(scores))


def _validate(squad_dir: Path, devices: int) -> dict:
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    model = KeywordQA("paris", encoder="bert-tiny", version_2_with_negative=True)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo") if devices > 1 else "auto"
    trainer = Trainer(
        default_root_dir=squad_dir,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveScores(squad_dir)],
    )
    trainer.validate(model, _squad_data(squad_dir))
    return json.loads((squad_dir / f"scores{devices}_0.json").read_text())


@pytest.mark.slow  # two spawned processes: about a minute
def test_ddp_counts_each_question_once(squad_dir: Path) -> None:
    # Seven questions in one held-out article whose long contexts become an odd number of windows: the
    # DistributedSampler repeats a window, and the two processes see different windows of one question.
    capital = "Paris is the capital of France. " + FILLER
    items = [(capital, f"Which city is question {i} about?", "Paris") for i in range(3)]
    items += [(CONTEXT, "Who built the tower?", "Gustave Eiffel"), (capital + CONTEXT, "Where?", "Paris")]
    items += [(CONTEXT, "Who sang?", None), ("Paris is the capital of France.", "Where is Rome?", None)]
    articles = {"Train": [(capital, "Capital?", "Paris")], "Held": items}
    (squad_dir / "squad.json").write_text(json.dumps(squad_json(articles)))
    dm = _squad_data(squad_dir)
    dm.setup("validate")
    assert len(dm.examples("val")) == 7 and len(dm.datasets["val"]) % 2 == 1
    one = _validate(squad_dir, 1)
    two = _validate(squad_dir, 2)
    rank1 = json.loads((squad_dir / "scores2_1.json").read_text())
    assert one["val/questions"] == 7 and 0 < one["val/em"] < 100
    # Right: the four "Paris" answers, and "." for "Who sang?" (impossible), which normalizes to the empty answer.
    assert one["val/em"] == pytest.approx(100 * 5 / 7)
    assert two == pytest.approx(one) and rank1 == pytest.approx(one)


def test_answer_raw_strings_and_a_file(tmp_path: Path) -> None:
    model = KeywordQA("paris", encoder="bert-tiny")
    long_context = FILLER * 6 + "Its capital is Paris. " + FILLER
    results = model.answer(
        ["Capital?"] * 2, ["Paris is large.", long_context], max_length=48, doc_stride=8, max_query_length=16
    )
    assert [r["answer"] for r in results] == ["Paris", "Paris"]
    assert results[1]["start"] == long_context.index("Paris") and 0 < results[1]["score"] <= 1
    (tmp_path / "q.json").write_text(json.dumps([{"id": "a", "question": "Capital?", "context": "It is Paris."}]))
    assert model.predict_file(str(tmp_path / "q.json"))[0] | {"score": 0} == {
        "id": "a",
        "question": "Capital?",
        "answer": "Paris",
        "score": 0,
        "start": 6,
    }
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "Capital?"}]))
    with pytest.raises(ValueError, match="item 0 has no 'context' field"):
        model.predict_file(str(tmp_path / "bad.json"))


def test_fit_with_the_engine_groups_and_freezing(squad_dir: Path) -> None:
    from callbacks.lr_schedule import LRSchedule
    from callbacks.unfreezing import FreezeUnfreeze

    torch.manual_seed(0)
    model = ExtractiveQA(encoder="bert-tiny", lr=3e-3, backbone_lr=1e-3)
    dm = _squad_data(squad_dir, holdout_articles=["Three"])
    frozen_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = Trainer(
        default_root_dir=squad_dir,
        max_epochs=2,
        limit_train_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[FreezeUnfreeze(2), LRSchedule("constant", warmup=0)],
    )
    trainer.fit(model, dm)
    for name, param in model.backbone.named_parameters():  # frozen for both epochs: bit-identical
        assert torch.equal(param, frozen_before[name]), name
    names = {g["name"] for g in trainer.optimizers[0].param_groups}
    assert {"head", "backbone.embeddings", "backbone.layer0", "backbone.layer1"} <= names
    assert "val/f1" in trainer.callback_metrics and trainer.callback_metrics["val/questions"] == 2


def test_pretrained_encoder_starts_in_train_mode() -> None:
    # from_pretrained returns eval mode and Lightning keeps it: the encoder's dropout would never be on.
    assert ExtractiveQA().backbone.training
