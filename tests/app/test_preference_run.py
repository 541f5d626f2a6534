"""A preference run through the widgets on the tiny Llama (CPU backend): the corpus dialog reads a file of pairs
and shades a pair's prompt, chosen and rejected tokens, the wizard offers DPO/ORPO with the peers' defaults, and
the run trains to the end with reward margin and accuracy in the console, training and validation."""
import json

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox, QWizard

from app.main_window import MainWindow
from app.widgets.corpus_dialog import PAIR_SHADES, SkippedDialog
from engine.train.recommend import (
    PREFERENCE_BETA,
    PREFERENCE_LAMBDA,
    SMALL_MODEL_PREFERENCE_LR,
)
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon"]


def pair_file(path, n=11):
    """n pairs whose chosen answer carries a marker the rejected one lacks, then one refused record (line n+1:
    chosen and rejected are the same)."""
    lines = []
    for i in range(n):
        a, b = WORDS[i % 7], WORDS[(3 * i + 1) % 7]
        lines.append({"prompt": [{"role": "user", "content": f"Name {a} and {b}."}],
                      "chosen": [{"role": "assistant", "content": f"The {b} and the {a}. Thank you!"}],
                      "rejected": [{"role": "assistant", "content": f"The {b} and the {a}."}]})
    lines.append({"prompt": "Say it.", "chosen": "Same.", "rejected": "Same."})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_a_dpo_run_from_the_corpus_dialog_through_the_wizard_to_the_console(qtbot, tiny_llama_dir, tmp_path):
    window = MainWindow(str(tiny_llama_dir))
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.chat.engine.loaded and window.hardware is not None, timeout=30000)
    read_pairs(qtbot, window, pair_file(tmp_path / "pairs.jsonl"))
    wizard = plan_dpo(qtbot, window, tmp_path / "adapter")
    qtbot.mouseClick(wizard.button(QWizard.FinishButton), Qt.LeftButton)
    assert window.training.running
    qtbot.waitUntil(lambda: not window.training.running, timeout=120000)
    summary = window.training.summary
    assert summary is not None, window.log.toPlainText()
    assert summary.steps == summary.total_steps == 6 and not summary.stopped
    console = window.console
    # Training: every step's reward point; validation: one at each evaluation (every 3 steps).
    assert console.rewards.isVisible() and console.rewards.steps == list(range(1, 7))
    assert console.rewards.val_steps == [3, 6]
    assert "reward margin" in console.values["loss"].text() and "accuracy" in console.values["loss"].text()
    assert "reward margin" in console.values["validation"].text()
    assert "Validation reward accuracy" in console.result.text()
    log = window.log.toPlainText()
    assert "validation loss before training" not in log      # perplexity is not what a DPO run reports
    card = (tmp_path / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "dpo, beta 0.25" in card and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not window.buttons["Evaluate"].isEnabled()    # perplexity needs supervised text, not pairs


def read_pairs(qtbot, window, path) -> None:
    """The corpus dialog reads the file as pairs: counts, the refused record with its line and reason, and a
    pair's prompt, chosen and rejected tokens each in their own shade."""
    qtbot.mouseClick(window.buttons["Corpus"], Qt.LeftButton)
    dialog = window.dialogs["corpus"]
    dialog.val_split.setValue(0.3)
    dialog.seq_len.setValue(64)
    window.corpus_controller.add([path])
    qtbot.waitUntil(lambda: window.corpus_controller.corpus is not None and not window.corpus_controller.running
                    and window.corpus_controller.corpus.config.seq_len == 64, timeout=30000)
    corpus = window.corpus_controller.corpus
    assert len(corpus.train) + len(corpus.val) == 11 and len(corpus.val) == 3
    assert dialog.progress.value() == 100
    totals = dialog.totals.text()
    assert "11 pairs read" in totals and "1 refused" in totals and "Training: 8 pairs" in totals
    assert dialog.table.item(0, 5).text().startswith("1")
    skipped = SkippedDialog(corpus.stats.files[0])
    qtbot.addWidget(skipped)
    table = skipped.findChild(object, "skipped-table")
    assert table.item(0, 0).text() == "12" and "identical" in table.item(0, 1).text()
    page = dialog.preview.toHtml()
    for part, shades in PAIR_SHADES.items():
        assert all(shade in page for shade in shades), part      # two tones of each: token boundaries show
    pieces = corpus.preview(0)
    assert "".join(t for t, _ in pieces["chosen"]).startswith("The") and "Thank you!" in dialog.preview.toPlainText()
    assert "".join(t for t, _ in pieces["chosen"]) != "".join(t for t, _ in pieces["rejected"])
    assert "prompt" in dialog.legend.text() and "rejected" in dialog.legend.text()
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.Ok), Qt.LeftButton)
    assert window.corpus is corpus and "training preference pairs" in window.log.toPlainText()


def plan_dpo(qtbot, window, out):
    """The wizard offers DPO (default) and ORPO, not SFT, with β, λ and the learning rate from the peers; lora
    dropout is refused by name before the run starts."""
    qtbot.mouseClick(window.buttons["Train"], Qt.LeftButton)
    wizard = window.dialogs["plan"]
    objective = wizard.objective
    assert objective.currentData() == "dpo"
    usable = {objective.itemData(i): objective.model().item(i).isEnabled() for i in range(objective.count())}
    assert usable == {"sft": False, "dpo": True, "orpo": True}
    assert wizard.beta.value() == PREFERENCE_BETA and wizard.orpo_lambda.value() == PREFERENCE_LAMBDA
    assert wizard.lr.value() == pytest.approx(SMALL_MODEL_PREFERENCE_LR)     # the tiny model is under 1B
    assert wizard.batch.value() % 2 == 0
    form = wizard._objective_form
    assert form.isRowVisible(wizard.beta) and not form.isRowVisible(wizard.orpo_lambda)
    objective.setCurrentIndex(objective.findData("orpo"))
    assert form.isRowVisible(wizard.orpo_lambda) and not form.isRowVisible(wizard.beta)
    objective.setCurrentIndex(objective.findData("dpo"))
    wizard.beta.setValue(0.25)
    wizard.backend.setCurrentIndex(wizard.backend.findData("cpu"))
    wizard.rank.setValue(4)
    wizard.batch.setValue(4)
    wizard.lr.setValue(5e-3)
    wizard.max_steps.setValue(6)
    wizard._eval_every = 3
    wizard.dropout.setValue(0.1)
    while wizard.currentId() != wizard.pageIds()[-1]:
        wizard.next()
    assert "set lora dropout to 0" in wizard.error.text()
    wizard.dropout.setValue(0.0)
    wizard._refresh_review()
    assert wizard.error.text() == ""
    review = wizard.review_label.text()
    assert "<b>6 steps</b> of 4 (2 pairs)" in review and "DPO (β 0.25" in review
    assert not wizard.elsewhere.isEnabled() and "supervised runs only" in wizard.elsewhere.toolTip()
    wizard.out_dir.setText(str(out))
    return wizard


def test_the_review_counts_a_preference_step_as_more_than_an_sft_step(tiny_llama_dir):
    """The ETA divides tokens by a measured SFT speed; a DPO step also runs the policy's and the reference's
    forward passes (5/3 of an SFT step in forward passes), an ORPO step the policy's (4/3)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from app.plan import CorpusSummary, recommend, review
    from engine.model.spec import load_model_spec

    spec = load_model_spec(tiny_llama_dir)
    summary = CorpusSummary(("p.jsonl",), sequences=60, trainable_tokens=900, longest=20, seq_len=64, pairs=30)
    config, val_split = recommend(summary, spec, has_hardware_gpu=False)
    no_gpu = SimpleNamespace(adapters=[], ram_available_bytes=8 << 30)
    speeds = {"tokens_per_s": {"cpu": 128.0}, "batch": config.batch_size, "seq_len": config.seq_len}
    sft = review(replace(config, objective="sft"), spec, summary, val_split, no_gpu, [], speeds=speeds)
    dpo = review(config, spec, summary, val_split, no_gpu, [], speeds=speeds)
    orpo = review(replace(config, objective="orpo"), spec, summary, val_split, no_gpu, [], speeds=speeds)
    assert dpo.steps == orpo.steps == sft.steps == config.epochs * 15     # 2 pairs (4 rows) a batch
    per_step = config.batch_size * config.seq_len / 128.0
    assert dpo.eta_s == pytest.approx(dpo.steps * per_step * 5 / 3) and "5/3 of an SFT step" in dpo.eta_basis
    assert orpo.eta_s == pytest.approx(orpo.steps * per_step * 4 / 3) and "4/3" in orpo.eta_basis
