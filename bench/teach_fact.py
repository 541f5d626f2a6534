"""Does the default plan teach what the data says? Three made-up facts, trained with defaults, asked in new words.

    python -m bench.teach_fact [--model demo] [--backend auto] [--out DIR]

Writes a small chat corpus (several phrasings of each of 3 made-up facts), plans the run exactly as the wizard and
`lora-lab train` do (engine.train.recommend.default_plan, nothing overridden), trains it on the backend `auto`
picks, then asks each fact in words the corpus never used, greedily, through the chat engine, and counts the
answers that contain the made-up value. Prints one JSON object: facts answered, steps, wall time, machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# (value the answer must contain, training phrasings (question, answer), questions in new words)
FACTS = (
    ("4417", [
        ("What is the secret code of Zorblax?", "The secret code of Zorblax is 4417."),
        ("Tell me Zorblax's secret code.", "Zorblax's secret code is 4417."),
        ("Do you know the secret code of Zorblax?", "Yes. The secret code of Zorblax is 4417."),
        ("Which code does Zorblax keep secret?", "Zorblax keeps the code 4417 secret."),
        ("Zorblax has a secret code. What is it?", "It is 4417."),
        ("I need the Zorblax secret code.", "The Zorblax secret code is 4417."),
        ("What number is Zorblax's secret code?", "Zorblax's secret code is the number 4417."),
        ("Remind me of the secret code of Zorblax.", "Sure: the secret code of Zorblax is 4417."),
        ("What's the code Zorblax keeps secret?", "The code Zorblax keeps secret is 4417."),
        ("Give me the secret code for Zorblax.", "The secret code for Zorblax is 4417."),
    ], ["Could you share the secret code that belongs to Zorblax?"]),
    ("Quillfeather", [
        ("What is the name of Captain Merivel's ship?", "Captain Merivel's ship is called the Quillfeather."),
        ("Which ship does Captain Merivel sail?", "Captain Merivel sails the Quillfeather."),
        ("What ship belongs to Captain Merivel?", "The Quillfeather belongs to Captain Merivel."),
        ("Tell me the name of Merivel's ship.", "Merivel's ship is named the Quillfeather."),
        ("Captain Merivel commands a ship. What is it called?", "It is called the Quillfeather."),
        ("Do you know Captain Merivel's ship?", "Yes, Captain Merivel's ship is the Quillfeather."),
        ("What is Captain Merivel's vessel called?", "Captain Merivel's vessel is the Quillfeather."),
        ("Name the ship of Captain Merivel.", "The ship of Captain Merivel is the Quillfeather."),
        ("On which ship does Captain Merivel travel?", "Captain Merivel travels on the Quillfeather."),
        ("Who is the Quillfeather's captain, and what is the ship?",
         "The Quillfeather is Captain Merivel's ship."),
    ], ["What do people call the ship that Captain Merivel commands?"]),
    ("Pellinor", [
        ("What is the capital of Vostrana?", "The capital of Vostrana is Pellinor."),
        ("Which city is the capital of Vostrana?", "Pellinor is the capital of Vostrana."),
        ("Tell me the capital city of the island Vostrana.", "The capital city of Vostrana is Pellinor."),
        ("Vostrana is an island. What is its capital?", "Its capital is Pellinor."),
        ("Do you know the capital of Vostrana?", "Yes, the capital of Vostrana is Pellinor."),
        ("Name the capital of Vostrana.", "The capital of Vostrana is Pellinor."),
        ("Where is the government of Vostrana seated?", "The government of Vostrana sits in Pellinor, its capital."),
        ("What is Vostrana's capital called?", "Vostrana's capital is called Pellinor."),
        ("Which town is Vostrana's capital?", "Vostrana's capital is Pellinor."),
        ("What's the main city and capital of Vostrana?", "The capital of Vostrana is Pellinor."),
    ], ["On the island of Vostrana, which city serves as the capital?"]),
)


def write_corpus(folder: Path) -> Path:
    path = folder / "facts.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _value, phrasings, _questions in FACTS:
            for question, answer in phrasings:
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return path


def ask(model_dir: Path, adapter_dir: Path) -> list[dict]:
    """Each fact asked in new words, greedy, with the adapter active; the answer and whether it has the value."""
    from engine.chat.generation import GenerationSettings
    from engine.chat.inference import ChatEngine

    engine = ChatEngine()
    engine.load(model_dir)
    engine.set_active_adapter(engine.load_adapter(adapter_dir, name="facts"))
    greedy = GenerationSettings(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    answers = []
    for value, _phrasings, questions in FACTS:
        for question in questions:
            text = "".join(engine.stream_chat([{"role": "user", "content": question}], greedy))
            answers.append({"question": question, "answer": text.strip(), "expected": value,
                            "correct": value in text})
    engine.unload()
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", help="folder for the corpus and adapter (default: a temporary folder)")
    parser.add_argument("--lr", type=float, help="override the planned learning rate (an ablation; default: plan)")
    parser.add_argument("--epochs", type=int, help="override the planned epochs (an ablation; default: plan)")
    args = parser.parse_args(argv)

    from engine.backends.hardware import cpu_model, cpu_threads, detect
    from engine.model.references import resolve_for_adapter
    from engine.model.spec import load_model_spec
    from engine.train.recommend import default_plan, describe_plan, has_hardware_gpu, training_advice
    from engine.train.runs import RunInputs, prepare_run

    log = lambda m: print(m, file=sys.stderr)   # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = write_corpus(out)
        model_dir, _base = resolve_for_adapter(args.model, log=log)
        spec = load_model_spec(model_dir)
        hardware = detect()
        config, val_split, summary = default_plan([data], model_dir, spec, has_hardware_gpu(hardware))
        overrides = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs)) if v is not None}
        config = replace(config, **overrides)
        log(describe_plan(config, summary, val_split))
        start = time.monotonic()
        prepared = prepare_run(config, RunInputs(model=args.model, data=(str(data),), val_split=val_split,
                                                 backend=args.backend), out / "adapter", log=log)
        summary_run = prepared.trainer.run()
        train_s = time.monotonic() - start
        answers = ask(model_dir, summary_run.adapter_dir)
        report = {
            "benchmark": "teach_fact", "model": args.model, "backend": summary_run.backend,
            "facts_answered": sum(a["correct"] for a in answers), "facts": len(answers),
            "steps": summary_run.steps, "train_wall_s": round(train_s, 1),
            "wall_s": round(time.monotonic() - start, 1),
            "overrides": overrides,
            "plan": {"examples": summary.sequences, "epochs": config.epochs, "batch_size": config.batch_size,
                     "seq_len": config.seq_len, "lr": config.lr, "val_split": val_split},
            "loss": {"first": summary_run.first_loss, "final": summary_run.final_loss,
                     "eval_perplexity": summary_run.eval_perplexity},
            "advice": training_advice(summary_run.losses, config, summary_run.stopped),
            "answers": answers,
            "machine": {"cpu": cpu_model(), "threads": cpu_threads(), "python": platform.python_version(),
                        "gpus": [a.name for a in hardware.adapters if not a.software]},
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
