"""Chat inference on transformers + peft: load a model, keep several LoRA adapters, stream answers. No Qt.

`ChatEngine` is driven from one worker thread (the GUI's QThread, the CLI, a test); the handover coordinator
may call `cancel()`/`unload()`/`restore()` from another, so state changes happen under one lock and a running
answer is always stopped and joined before the model changes. Adapters are injected into the one base model
with peft and switched per answer, so switching (or answering with the base alone) never reloads the base.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from engine.chat.fit import ModelTooLarge, chat_dtype, chat_memory, check_chat_fits
from engine.chat.generation import ChatStream, GenerationSettings
from engine.corpus.render import chat_template_of
from engine.model.weights import from_pretrained_args
from engine.lora.peft_read import adapter_settings, load_adapter_config, read_adapter_tensors


class ChatUnavailable(RuntimeError):
    """A chat request that cannot be served right now; the message says why and what to do."""


class ModelNotLoaded(ChatUnavailable):
    pass


class TrainingInProgress(ChatUnavailable):
    pass


class ChatBusy(ChatUnavailable):
    """An answer is still being generated."""


class AdapterError(ValueError):
    pass


class _ActiveAdapter:
    def __repr__(self):
        return "ACTIVE"


# An answer normally uses the active adapter; `adapter=ACTIVE` says so explicitly (None means the base alone).
ACTIVE = _ActiveAdapter()

@dataclass(frozen=True)
class ChatSnapshot:
    """What the chat had loaded, so the handover can bring exactly this back after training."""

    model_ref: str
    model_path: Path  # the local folder model_ref resolved to, so coming back needs no download or conversion
    adapters: tuple[tuple[str, Path], ...]  # (name, folder) in load order
    active: str | None


@dataclass(frozen=True)
class UnloadReport:
    seconds: float
    tensors_released: int  # parameters and buffers the model had
    tensors_still_referenced: int  # of those, still alive after our references went and gc ran: must be 0
    memory_after: dict | None  # torch_memory() of the device afterwards


def best_device() -> torch.device:
    """CUDA, then Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision wherever the device computes it natively (engine.chat.fit.chat_dtype): chat memory is the
    model's half-precision size. Tests that compare logits with a float32 oracle pass dtype=torch.float32."""
    return chat_dtype(device)


def trim_process_heap():
    """Return freed heap memory to the OS (glibc keeps freed blocks, even large ones, for reuse)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def release_cached_memory(device: torch.device):
    """Hand the framework's cached blocks back to the driver (or the OS), so another user can have them."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        # cuBLAS keeps its matmul workspaces in torch's allocator for the life of its handles; empty_cache alone
        # leaves them allocated (torch's own CUDA leak check clears them the same way before counting).
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    trim_process_heap()  # a model loaded on the CPU (or staged there) lived on the heap


def torch_memory(device: torch.device) -> dict | None:
    """Bytes torch holds on `device` (allocated by tensors, reserved by its caching allocator); None on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    if device.type == "mps":
        return {"allocated": torch.mps.current_allocated_memory(), "reserved": torch.mps.driver_allocated_memory()}
    return None


def resolve_model_folder(model_ref: str | Path) -> Path:
    """A local Hugging Face folder for `model_ref` (folder, .gguf file or hub id), via engine.model.references."""
    from engine.model.references import resolve_model
    from engine.model.weights import check_model_files

    folder = Path(resolve_model(model_ref))
    # Damaged weights, or weights of another model than config.json describes, are refused by name: transformers
    # would fill what is missing with random values and answer.
    check_model_files(folder)
    return folder


def _check_messages(messages: Sequence[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"chat history must be a non-empty list of messages, got {messages!r}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', got {message!r}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"chat message {i} has role {message['role']!r}; use system, user or assistant")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


class ChatEngine:
    """One chat model on one torch device, with LoRA adapters applied through peft."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else best_device()
        if self.device.type == "cuda" and self.device.index is None:
            # An explicit index keeps device_map, memory queries and synchronize on the same GPU.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self._lock = threading.RLock()
        self._model = None  # a transformers PreTrainedModel, or a peft PeftModel around it once adapters exist
        self._tokenizer = None
        # The tokenizer holds no device memory, so it survives unload() and makes the reload after training faster.
        self._tokenizer_cache: tuple[Path, object] | None = None
        self._model_ref: str | None = None
        self._model_path: Path | None = None
        self._adapters: dict[str, Path] = {}
        self._active: str | None = None
        self._stream: ChatStream | None = None
        self._lockout: ChatUnavailable | None = None
        # Called with True when an answer starts and False when it ends (from the generating thread).
        self.generation_listeners: list[Callable[[bool], None]] = []

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model_ref(self) -> str | None:
        return self._model_ref

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def adapter_paths(self) -> dict[str, Path]:
        return dict(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def generating(self) -> bool:
        stream = self._stream
        return stream is not None and not stream.finished.is_set()

    def lock_out(self, reason: ChatUnavailable | None):
        """Refuse chat requests with `reason` (the handover sets TrainingInProgress); None lets them in again."""
        self._lockout = reason

    def _check_lockout(self):
        reason = self._lockout
        if reason is not None:
            raise type(reason)(*reason.args)  # a fresh exception per request, not one traceback piling up

    def _require_model(self):
        self._check_lockout()
        if self._model is None:
            raise ModelNotLoaded("no chat model is loaded; load a model first")

    def _require_idle(self, doing: str):
        stream = self._stream
        if stream is not None and stream.stopping:
            # A stopped answer ends its iteration at once but lets go of the model only after the token in
            # flight: wait for that rather than refuse the next request.
            stream.wait(timeout=30)
        if self.generating:
            raise ChatBusy(f"cannot {doing} while an answer is being generated; stop it or wait for it to end")

    # -- model -------------------------------------------------------------------------------------------------
    def load(self, model_ref: str | Path):
        """Load a model (local folder, .gguf, hub id) on this engine's device, replacing any loaded one."""
        self._check_lockout()
        with self._lock:
            self._require_idle("load a model")
            if self._model is not None:
                self.unload()
            self._load(str(model_ref), resolve_model_folder(model_ref))

    def _load(self, model_ref: str, path: Path):
        if self._tokenizer_cache is not None and self._tokenizer_cache[0] == path:
            tokenizer = self._tokenizer_cache[1]
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # A template-less base is prompted with the template its adapters were trained with.
            tokenizer.chat_template = chat_template_of(tokenizer)
        try:
            # A folder made from a GGUF file has no weights of its own: transformers' GGUF loader reads the file.
            source, gguf = from_pretrained_args(path)
            check_chat_fits(model_ref, chat_memory(path, self.dtype, self.device, bool(gguf)), self.dtype,
                            self.device)
            # device_map puts the weights straight onto the device instead of staging a CPU copy first.
            model = AutoModelForCausalLM.from_pretrained(source, **gguf, dtype=self.dtype, device_map=self.device)
        except ModelTooLarge:
            raise
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ValueError(f"could not load chat model {model_ref} from {path}: {exc}") from exc
        model.eval()
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        self._model, self._tokenizer, self._tokenizer_cache = model, tokenizer, (path, tokenizer)
        self._model_ref, self._model_path = model_ref, path
        self._adapters, self._active = {}, None

    def unload(self) -> UnloadReport:
        """Stop any answer, drop the model and its adapters, and give the device memory back."""
        started = time.perf_counter()
        self.cancel()
        with self._lock:
            model = self._model
            refs = []
            if model is not None:
                refs = [weakref.ref(t) for t in [*model.parameters(), *model.buffers()]]
            self._model = self._tokenizer = self._stream = None
            self._model_ref = self._model_path = None
            self._adapters, self._active = {}, None
            del model
            alive = sum(r() is not None for r in refs)
            if alive:
                # Reference cycles (peft wraps the base) keep some tensors until the cycle collector runs; a
                # full collection costs a few hundred ms in a process with torch loaded, so only when needed.
                gc.collect()
                alive = sum(r() is not None for r in refs)
            release_cached_memory(self.device)
            return UnloadReport(time.perf_counter() - started, len(refs), alive, torch_memory(self.device))

    def snapshot(self) -> ChatSnapshot | None:
        with self._lock:
            if self._model is None:
                return None
            return ChatSnapshot(self._model_ref, self._model_path, tuple(self._adapters.items()), self._active)

    def restore(self, snapshot: ChatSnapshot, new_adapter: Path | None = None) -> str | None:
        """Reload what `snapshot` had, add `new_adapter` and make it active (else the snapshot's active one).

        The handover's way back after training: it works while chat requests are locked out. Returns the name
        of the new adapter. An adapter that no longer loads (folder gone, files replaced by something that does
        not fit) does not keep the chat away: everything else is restored first, then AdapterError names it.
        """
        with self._lock:
            if self._model is not None:
                self.unload()
            self._load(snapshot.model_ref, snapshot.model_path)
            new_path = Path(new_adapter).resolve() if new_adapter is not None else None
            new_name, problems = None, []
            for name, path in snapshot.adapters:
                try:
                    self._load_adapter(path, name)
                except AdapterError as exc:
                    problems.append(str(exc))
                    continue
                if path == new_path:  # retrained into the same folder: the files there are the new ones
                    new_name = name
            self._active = snapshot.active if snapshot.active in self._adapters else None
            if new_path is not None and new_name is None:
                try:
                    new_name = self._load_adapter(new_path, None)
                except AdapterError as exc:
                    problems.append(str(exc))
            if new_name is not None:
                self._active = new_name
            if problems:
                raise AdapterError("the chat model is back, but not every adapter: " + "; ".join(problems))
            return new_name

    # -- adapters ----------------------------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Add the PEFT adapter in folder `path` (named after the folder unless `name`); returns its name.

        The new adapter is not made active; call set_active_adapter(name) for that.
        """
        with self._lock:
            self._require_model()
            self._require_idle("load an adapter")
            return self._load_adapter(Path(path), name)

    def _load_adapter(self, path: Path, name: str | None) -> str:
        from peft import PeftModel

        path = path.expanduser().resolve()
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"{path} is not a PEFT adapter folder (no adapter_config.json); "
                               "choose the folder a LoRA training run saved")
        if name is None:
            name, n = path.name or "adapter", 2
            while name in self._adapters:
                name, n = f"{path.name}-{n}", n + 1
        elif not isinstance(name, str) or not name or name in self._adapters:
            raise AdapterError(f"adapter name {name!r} is empty or already used by {self._adapters.get(name)}")
        try:
            # The one adapter check every command makes: a corrupt, non-float or non-finite file is refused by
            # name here, before peft reads it (its SafetensorError names no file; NaN weights answer nothing).
            config = load_adapter_config(path)
            if config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
                raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA and AdaLoRA "
                                   "adapters are supported")
            if config.get("peft_type", "LORA") == "LORA":
                # An AdaLoRA adapter's rank_pattern holds each module's kept-triplet mask, which peft resolves.
                adapter_settings(config, path)
            read_adapter_tensors(path)
        except (ValueError, FileNotFoundError) as exc:
            raise AdapterError(str(exc)) from None
        first = not isinstance(self._model, PeftModel)
        try:
            if first:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name, is_trainable=False)
            else:
                self._model.load_adapter(path, adapter_name=name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            self._undo_failed_adapter(name, first)
            raise AdapterError(f"adapter {path} does not fit model {self._model_ref}: {exc}") from exc
        self._model.eval()
        self._adapters[name] = path
        return name

    def _undo_failed_adapter(self, name: str, first: bool):
        from peft.tuners.lora import LoraLayer

        if not first:
            if name in self._model.peft_config:
                self._model.delete_adapter(name)
            return
        # A failed first load may have injected LoRA layers into the base in place: reload a clean base.
        if any(isinstance(m, LoraLayer) for m in self._model.modules()):
            ref, path = self._model_ref, self._model_path
            self._model = None
            gc.collect()
            self._load(ref, path)

    def remove_adapter(self, name: str):
        with self._lock:
            self._require_model()
            self._require_idle("remove an adapter")
            self._check_adapter(name)
            if len(self._adapters) == 1:
                self._model = self._model.unload()  # strips the LoRA layers, giving back the plain base
            else:
                # peft warns when the adapter it computes with is deleted; point it at a remaining one first.
                self._model.set_adapter(next(n for n in self._adapters if n != name), inference_mode=True)
                self._model.delete_adapter(name)
            del self._adapters[name]
            if self._active == name:
                self._active = None

    def set_active_adapter(self, name: str | None):
        """Answer with adapter `name` from now on; None answers with the base model alone."""
        with self._lock:
            self._require_model()
            if name is not None:
                self._check_adapter(name)
            self._active = name

    def _check_adapter(self, name):
        if name not in self._adapters:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters) or 'none'}")

    def _adapter_for_call(self, adapter) -> str | None:
        """The adapter one call computes with: `adapter` (ACTIVE: the active one; None: the base alone)."""
        name = self._active if adapter is ACTIVE else adapter
        if name is not None:
            self._check_adapter(name)
        return name

    @staticmethod
    @contextlib.contextmanager
    def _adapter_applied(model, name: str | None):
        """Make `model` compute with adapter `name` (None: the base) for one call."""
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            yield
        elif name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name, inference_mode=True)
            yield

    # -- chat --------------------------------------------------------------------------------------------------
    def prompt_inputs(self, messages: Sequence[dict]) -> dict:
        """The chat history rendered through the model's chat template: input_ids/attention_mask on device."""
        encoded = self._tokenizer.apply_chat_template(_check_messages(messages), add_generation_prompt=True,
                                                      return_dict=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def stream_chat(self, messages: Sequence[dict], settings: GenerationSettings | None = None,
                    cancel_event: threading.Event | None = None, adapter=ACTIVE) -> ChatStream:
        """Start answering the chat `messages`; iterate the returned stream for the text as it is generated.

        Setting `cancel_event` (or calling cancel()) stops after the token in flight. `adapter` overrides the
        active adapter for this answer only (None: the base model), which is how compare mode asks both.
        """
        settings = settings if settings is not None else GenerationSettings()
        if not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be GenerationSettings, got {type(settings).__name__}")
        with self._lock:
            self._require_model()
            self._require_idle("start another answer")
            inputs = self.prompt_inputs(messages)
            name = self._adapter_for_call(adapter)  # fixed now: a later switch applies to the next answer
            model = self._model

            def generate(criteria, streamer):
                with self._adapter_applied(model, name), torch.no_grad():
                    if settings.seed is not None:
                        # generate() samples from torch's global generator; seeding it makes answers repeatable.
                        torch.manual_seed(settings.seed)
                    model.generate(**inputs, **settings.generate_kwargs(), streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([criteria]))

            self._notify(True)
            self._stream = ChatStream(generate, self._tokenizer, cancel_event, on_finished=lambda: self._notify(False))
            return self._stream

    def side_by_side_supported(self, adapters: Sequence[str | None]) -> bool:
        """Whether stream_side_by_side can answer with these adapters: peft applies one adapter per row of a batch
        for plain LoRA only, not DoRA (its `adapter_names` refuses a DoRA adapter)."""
        from peft import PeftModel

        model = self._model
        if not isinstance(model, PeftModel):
            return True
        return not any(getattr(model.peft_config[name], "use_dora", False) for name in adapters
                       if name is not None and name in model.peft_config)

    def stream_side_by_side(self, jobs: Sequence[tuple[Sequence[dict], str | None]],
                            settings: GenerationSettings | None = None,
                            cancel_event: threading.Event | None = None) -> ChatStream:
        """Answer several chats at once: `jobs` holds (messages, adapter) per column (adapter None: the base model).

        Iterating the stream gives (column, piece). The columns are one batch (left-padded prompts; peft's
        `adapter_names` applies each column's adapter to its row only), so every generation step adds a token to
        each answer: compare mode sees both answers grow together instead of the adapter's waiting for the base's.
        """
        from peft import PeftModel

        settings = settings if settings is not None else GenerationSettings()
        if not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be GenerationSettings, got {type(settings).__name__}")
        if not jobs:
            raise ValueError("stream_side_by_side needs at least one (messages, adapter) job")
        with self._lock:
            self._require_model()
            self._require_idle("start another answer")
            names = [self._adapter_for_call(adapter) for _, adapter in jobs]
            if not self.side_by_side_supported(names):
                raise ValueError(f"adapters {names} cannot answer in one batch (DoRA); answer one after the other")
            prompts = [self.prompt_inputs(messages)["input_ids"][0].tolist() for messages, _ in jobs]
            model = self._model
            pad = model.generation_config.pad_token_id
            width = max(len(p) for p in prompts)
            # (columns, width): prompts padded on the left, so every row's next token comes right after its prompt.
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                          device=self.device)
            extra = {}
            if isinstance(model, PeftModel):
                extra["adapter_names"] = ["__base__" if name is None else name for name in names]
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

            def generate(criteria, streamer):
                with torch.no_grad():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra,
                                   **settings.generate_kwargs(), streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([criteria]))

            self._notify(True)
            self._stream = ChatStream(generate, self._tokenizer, cancel_event, on_finished=lambda: self._notify(False),
                                      rows=len(jobs), eos_ids=eos_ids)
            return self._stream

    def cancel(self):
        """Stop the answer being generated, if any, and wait until it has let go of the model."""
        stream = self._stream
        if stream is not None:
            stream.cancel(wait=True)

    def _notify(self, generating: bool):
        for listener in list(self.generation_listeners):
            listener(generating)

    def logits(self, text: str, adapter=ACTIVE) -> torch.Tensor:
        """Logits (tokens, vocab) as float32 on CPU for plain `text` (no chat template): for tests and checks."""
        with self._lock:
            self._require_model()
            self._require_idle("compute logits")
            ids = self._tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
            with self._adapter_applied(self._model, self._adapter_for_call(adapter)), torch.no_grad():
                return self._model(input_ids=ids).logits[0].float().cpu()
