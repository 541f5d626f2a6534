"""Adaptive rank (AdaLoRA) in the window: the plan wizard's choice and budget, the console's rank map, and the
rank map's trip from the training process."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from PySide6.QtCore import QEvent, QPoint
from PySide6.QtGui import QHelpEvent
from PySide6.QtWidgets import QApplication, QToolTip

from app.chat_controller import ChatController
from app.plan import CorpusSummary, adaptive_settings
from app.training_controller import RunRequest, TrainingController
from app.widgets.rank_map import HIGH, LOW, RankMap, cell_color
from app.widgets.training_console import TrainingConsole
from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig
from engine.train.trainer import StepEvent
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

RANKS = ((12, 0, 7), (3, 12, 9))    # [layer][target] for 2 layers x (q_proj, v_proj, down_proj)


def step(n, rank_map=None):
    return StepEvent(step=n, total=4, epoch=0, loss=0.5, lr=1e-5, grad_norm=1.0, tokens=10, tokens_per_s=1.0,
                     elapsed_s=1.0, eta_s=1.0, memory_bytes=0, skipped=False, rank_map=rank_map)


def request(adaptive: bool) -> RunRequest:
    lora = LoraConfig(rank=12, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    config = TrainConfig(lora=lora, max_steps=40, adaptive_rank=adaptive_settings(12, 8, 40) if adaptive else None)
    return RunRequest(model="m", files=("a.jsonl",), val_split=0.0, config=config, out_dir=Path("out"))


def test_adaptive_phases_are_fractions_of_the_run():
    s = adaptive_settings(12, 8, 100)
    assert (s.init_r, s.target_r, s.tinit, s.tfinal, s.total_step, s.deltaT) == (12, 8, 10, 20, 100, 1)
    short = adaptive_settings(4, 2, 3)          # a three-step run still has a budgeting phase
    assert short.tinit < short.total_step - short.tfinal


def test_rank_map_cells_tooltips_and_scale(qtbot):
    widget = RankMap()
    qtbot.addWidget(widget)
    widget.resize(300, 200)
    widget.reset(("q_proj", "v_proj", "down_proj"), 12)
    widget.set_ranks(RANKS)
    widget.show()
    for layer, row in enumerate(RANKS):
        for column, rank in enumerate(row):
            centre = widget.cell_rect(layer, column).center()
            assert widget.cell_at(centre) == (layer, column)
    assert widget.describe(0, 1) == "layer 0, v_proj: rank 0 of 12 (pruned: no adapter)"
    assert widget.describe(1, 2) == "layer 1, down_proj: rank 9 of 12"
    assert widget.cell_at(QPoint(2, 2)) is None                  # the layer labels are no cell
    centre = widget.cell_rect(1, 2).center()
    QApplication.sendEvent(widget, QHelpEvent(QEvent.ToolTip, centre, widget.mapToGlobal(centre)))
    assert QToolTip.text() == "layer 1, down_proj: rank 9 of 12"
    assert cell_color(0, 12) == LOW and cell_color(12, 12) == HIGH
    image = widget.grab().toImage()
    assert image.pixelColor(widget.cell_rect(0, 0).topLeft() + QPoint(1, 1)) == HIGH
    assert image.pixelColor(widget.cell_rect(0, 1).topLeft() + QPoint(1, 1)) == LOW


def test_console_shows_the_rank_map_for_adaptive_runs_only(qtbot):
    controller = TrainingController(ChatController().handover)
    console = TrainingConsole(controller)
    qtbot.addWidget(console)
    console.show()
    controller.started.emit(request(adaptive=False))
    controller.step.emit(step(1))
    assert not console.rank_map.isVisible()
    controller.started.emit(request(adaptive=True))
    controller.step.emit(step(1, RANKS))
    assert console.rank_map.isVisible() and console.rank_map.ranks == RANKS
    assert console.rank_map.targets == ("q_proj", "v_proj", "down_proj") and console.rank_map.top == 12
    controller.step.emit(step(2, ((11, 1, 7), (3, 12, 9))))
    assert console.rank_map.ranks[0] == (11, 1, 7)
    controller.started.emit(request(adaptive=False))          # the next plain run hides it again
    assert not console.rank_map.isVisible() and console.rank_map.ranks == ()


def test_rank_map_survives_the_training_process_queue():
    # app.training_process sends ("step", StepEvent) through a spawn-context queue, which pickles it.
    from app.training_process import CONTEXT

    events = CONTEXT.Queue()
    events.put(("step", step(3, RANKS)))
    kind, event = events.get(timeout=10)
    assert kind == "step" and event.rank_map == RANKS and event == step(3, RANKS)


@pytest.fixture
def wizard(qtbot, tiny_llama_dir):
    from app.widgets.plan_wizard import PlanWizard
    from engine.model.spec import load_model_spec

    summary = CorpusSummary(("a.jsonl",), sequences=40, trainable_tokens=30000, longest=50, seq_len=64)
    no_gpu = SimpleNamespace(adapters=[], ram_available_bytes=8 << 30)
    w = PlanWizard("tiny", tiny_llama_dir, load_model_spec(tiny_llama_dir), summary, no_gpu, [])
    qtbot.addWidget(w)
    return w


def test_wizard_maps_the_adaptive_choice_into_the_config(wizard):
    from app.plan import total_steps

    assert wizard.config().adaptive_rank is None and not wizard.init_rank.isEnabled()
    assert (wizard.init_rank.value(), wizard.target_rank.value()) == (12, 8)     # PEFT's defaults
    wizard.adaptive.setChecked(True)
    targets = sum(box.isChecked() for box in wizard.targets.values())
    assert not wizard.rank.isEnabled() and wizard.init_rank.isEnabled()
    assert wizard.budget.text() == f"total rank {8 * 2 * targets} over {2 * targets} projections (from " \
                                   f"{12 * 2 * targets} at the start)"
    wizard.target_rank.setValue(5)
    config = wizard.config()
    assert config.lora.rank == 12
    assert config.adaptive_rank == adaptive_settings(12, 5, total_steps(config, 40, wizard.val_split.value()))
    wizard.show()
    while wizard.currentId() != wizard.pageIds()[-1]:
        wizard.next()
    text = wizard.review_label.text()
    assert "Adaptive rank (AdaLoRA)" in text and f"total-rank budget of {5 * 2 * targets}" in text
    wizard.target_rank.setValue(13)                 # more than the initial rank: the engine's refusal is shown
    wizard._refresh_review()
    assert "cannot exceed the initial rank" in wizard.error.text()


def test_wizard_offers_phi3s_fused_projections(qtbot, tiny_phi3_dir):
    """On Phi-3 the Method page's targets are the projections PEFT can adapt there, all checked by default."""
    from app.widgets.plan_wizard import PlanWizard
    from engine.model.spec import load_model_spec

    summary = CorpusSummary(("a.jsonl",), sequences=40, trainable_tokens=30000, longest=50, seq_len=64)
    no_gpu = SimpleNamespace(adapters=[], ram_available_bytes=8 << 30)
    w = PlanWizard("tiny", tiny_phi3_dir, load_model_spec(tiny_phi3_dir), summary, no_gpu, [])
    qtbot.addWidget(w)
    assert list(w.targets) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert all(box.isChecked() for box in w.targets.values())
    w.targets["o_proj"].setChecked(False)
    assert w.config().lora.targets == ("qkv_proj", "gate_up_proj", "down_proj")
