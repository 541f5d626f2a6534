"""`python -m app.screenshots OUT_DIR [--model REF] [--steps N]`: drive the real window through the journey and
save a PNG of each panel. Run it under a display (`xvfb-run -a -s "-screen 0 1600x1000x24" python -m
app.screenshots docs/screenshots`). Everything shown is computed by the engines; nothing is staged.

The corpus is a small chat JSONL written to a temporary folder (with one malformed line, so the skipped-line
report shows), a plain-text file and an empty one (refused, with its reason in its row). The runs list and the
last chat go to a data folder of the temporary one (LORA_LAB_HOME): the user's own stay untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CHATS = [
    ("What is LoRA?", "LoRA trains two small matrices per layer, A and B, whose product is added to a frozen weight."),
    ("Why is B zero at the start?", "So the adapted model starts exactly equal to the base model."),
    ("What does alpha do?", "The update is scaled by alpha / r, so the learning rate transfers across ranks."),
    ("Which layers get adapters?", "Usually the attention projections q, k, v, o and the MLP projections."),
    ("How big is an adapter?", "A few megabytes: r × (in + out) numbers per adapted projection."),
    ("Can I merge it?", "Yes: W + (alpha / r) · B A gives a plain model with the adapter folded in."),
]


def write_corpus(folder: Path) -> list[Path]:
    chats = folder / "chats.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in CHATS * 4]
    lines.insert(3, '{"messages": [oops, not json}')
    chats.write_text("\n".join(lines) + "\n", encoding="utf-8")
    notes = folder / "notes.txt"
    notes.write_text("Low-rank adaptation freezes the pretrained weights and learns a low-rank update.\n" * 20,
                     encoding="utf-8")
    empty = folder / "empty.txt"
    empty.write_text("", encoding="utf-8")
    return [chats, notes, empty]


def wait_until(app, condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.02)
    for _ in range(5):   # let pending paints land
        app.processEvents()
        time.sleep(0.02)


def save(widget, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    if not widget.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    print(path)
    return path


def main(argv=None) -> int:
    args = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    app = _start_app()

    from app.main_window import MainWindow
    from engine.model.references import resolve_model

    work = Path(tempfile.mkdtemp(prefix="lora-lab-shots-"))
    model = str(resolve_model(args.model))        # from the user's data folder, before it is set aside
    os.environ["LORA_LAB_HOME"] = str(work / "data")
    files = write_corpus(work)
    window = MainWindow(model)
    window.resize(1400, 880)
    window.show()
    wait_until(app, lambda: window.chat.engine.loaded and window.hardware is not None, 300, "the model")

    panels = args.panels
    if "hardware" in panels:
        _shoot_hardware(app, window, args.out)
    if panels & {"corpus", "train", "chat", "save"}:        # each of these needs the ones before it
        _shoot_corpus(app, window, args.out, files)
    if panels & {"train", "chat", "save"}:
        _shoot_plan_and_training(app, window, args.out, work / "adapter", args.backend, args.steps)
    if panels & {"chat", "save"}:
        _shoot_chat(app, window, args.out)
    if "save" in panels:
        _shoot_save(app, window, args.out, work / "saved")
    window.close()
    from app.workers import wait_for_workers

    wait_for_workers()
    return 0


def _parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.screenshots")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="demo", help="model reference (default: the demo model)")
    parser.add_argument("--steps", type=int, default=12, help="training steps for the console screenshot")
    parser.add_argument("--backend", default="cpu", help="training backend (default cpu)")
    parser.add_argument("--panels", default="hardware,corpus,train,chat,save",
                        type=lambda text: set(text.split(",")) - {""},
                        help="which shots to take (comma-separated): hardware, corpus, train (the wizard and the "
                             "console), chat (compare), save; each of the last four also takes the ones before it")
    return parser.parse_args(argv)


def _start_app():
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("LoRA-Lab-screenshots")   # settings of the user's own LoRA-Lab stay untouched
    app.setApplicationName("LoRA-Lab")
    QSettings().clear()
    return app


def _shoot_hardware(app, window, out: Path) -> None:
    window.buttons["Hardware"].click()
    hardware = window.dialogs["hardware"]
    hardware.benchmark.click()
    wait_until(app, lambda: hardware.benchmark.isEnabled() and hardware.benchmarks, 900, "the benchmark")
    save(hardware, out, "hardware")
    hardware.close()


def _shoot_corpus(app, window, out: Path, files: list[Path]) -> None:
    from PySide6.QtWidgets import QDialogButtonBox

    window.buttons["Corpus"].click()
    corpus = window.dialogs["corpus"]
    corpus.seq_len.setValue(128)        # before the files come: they are read as they are added
    corpus.val_split.setValue(0.2)
    window.corpus_controller.add(files)
    wait_until(app, lambda: window.corpus_controller.corpus is not None and not window.corpus_controller.running,
               300, "the corpus")
    corpus.example.setValue(1)
    save(corpus, out, "corpus")
    corpus.buttons.button(QDialogButtonBox.Ok).click()


def _shoot_plan_and_training(app, window, out: Path, adapter_dir: Path, backend: str, steps: int) -> None:
    """The wizard's method and review pages, then the console once the run is over and chat has the adapter."""
    from PySide6.QtWidgets import QWizard

    window.buttons["Train"].click()
    wizard = window.dialogs["plan"]
    wizard.backend.setCurrentIndex(max(0, wizard.backend.findData(backend)))
    wizard.next()
    wizard.next()
    save(wizard, out, "wizard-method")
    wizard.next()
    wizard.max_steps.setValue(steps)
    wizard.next()
    wizard.out_dir.setText(str(adapter_dir))
    wait_until(app, lambda: "steps" in wizard.review_label.text(), 10, "the review page")
    save(wizard, out, "wizard-review")
    wizard.button(QWizard.FinishButton).click()
    wait_until(app, lambda: not window.training.running, 1800, "training")
    wait_until(app, lambda: window.chat.active_adapter is not None, 300, "chat with the new adapter")
    save(window, out, "training-console")


def _shoot_chat(app, window, out: Path) -> None:
    window.tabs.setCurrentWidget(window.chat_panel)
    panel = window.chat_panel
    panel.generation.max_new_tokens.setValue(48)
    panel.generation.temperature.setValue(0.0)
    panel.compare.setChecked(True)
    panel.prompt.setPlainText("What is LoRA?")
    panel.send.click()
    wait_until(app, lambda: not window.chat.busy and window.chat.last_answer(), 600, "the answers")
    wait_until(app, lambda: "…" not in panel.views[-1].toPlainText(), 5, "the rendering")
    save(window, out, "chat-compare")


def _shoot_save(app, window, out: Path, folder: Path) -> None:
    from PySide6.QtWidgets import QDialogButtonBox

    window.buttons["Save Adapter"].click()
    dialog = window.dialogs["save"]
    dialog.folder.setText(str(folder))
    dialog.gguf.setChecked(True)
    dialog.buttons.button(QDialogButtonBox.Save).click()
    wait_until(app, lambda: bool(dialog.written) or "failed" in dialog.status.text(), 600, "saving")
    save(dialog, out, "save")
    dialog.close()


if __name__ == "__main__":
    sys.exit(main())
