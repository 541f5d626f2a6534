"""The training console shows a DPO/ORPO run's reward margin and accuracy, training and validation."""
from app.chat_controller import ChatController
from app.training_controller import TrainingController
from app.widgets.training_console import TrainingConsole
from engine.train.trainer import EvalEvent, StepEvent
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)


def step(n, margin=None, accuracy=None):
    return StepEvent(step=n, total=4, epoch=0, loss=0.5, lr=1e-5, grad_norm=1.0, tokens=10, tokens_per_s=1.0,
                     elapsed_s=1.0, eta_s=1.0, memory_bytes=0, skipped=False, reward_margin=margin,
                     reward_accuracy=accuracy)


def test_reward_plot_appears_for_preference_runs_only(qtbot):
    controller = TrainingController(ChatController().handover)
    console = TrainingConsole(controller)
    qtbot.addWidget(console)
    console.show()
    controller.step.emit(step(1))
    controller.evaluated.emit(EvalEvent(1, 2.0, 7.39, 10, 1.0))
    assert not console.rewards.isVisible() and "perplexity 7.390" in console.values["validation"].text()
    controller.step.emit(step(2, 0.25, 0.5))
    controller.step.emit(step(3, 0.75, 1.0))
    controller.evaluated.emit(EvalEvent(3, 0.4, float("nan"), 10, 2.0, reward_margin=0.6, reward_accuracy=0.9))
    assert console.rewards.isVisible()
    qtbot.waitUntil(lambda: console.rewards.margin.getData()[0] is not None and
                    len(console.rewards.margin.getData()[0]) == 2)
    assert list(console.rewards.accuracy.getData()[1]) == [0.5, 1.0]
    assert list(console.rewards.val_margin.getData()[1]) == [0.6]
    assert "reward margin +0.600, accuracy 0.900" in console.values["validation"].text()
    assert "reward margin +0.750" in console.values["loss"].text()
