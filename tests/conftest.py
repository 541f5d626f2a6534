"""Shared fixtures: tiny models per architecture, the fixture tokenizer, and a wgpu device (lavapipe in CI)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.tiny_models import ARCHITECTURES, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{arch: folder} for every supported architecture, built once per session."""
    dirs = {}
    for arch in ARCHITECTURES:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_model(arch, path)
        dirs[arch] = path
    return dirs


@pytest.fixture(params=ARCHITECTURES)
def tiny_model_dir(request, tiny_model_dirs):
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def _tiny(tmp_path_factory, arch: str):
    """A tiny random model of `arch` (bench/tiny_models.py), saved once per session."""
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    make_model(arch, path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory):
    """Gemma 2: soft-capped attention and logits, sliding layers shorter than the test sequences."""
    return _tiny(tmp_path_factory, "gemma2")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """Gemma 3 text, outside ARCHITECTURES: its own tests and those that name it use it."""
    return _tiny(tmp_path_factory, "gemma3")


@pytest.fixture(scope="session")
def tiny_granite_dir(tmp_path_factory):
    """Granite, outside ARCHITECTURES: its own tests use it."""
    return _tiny(tmp_path_factory, "granite")


@pytest.fixture(scope="session")
def tiny_olmo2_dir(tmp_path_factory):
    """OLMo 2, outside ARCHITECTURES: its own tests use it."""
    return _tiny(tmp_path_factory, "olmo2")


@pytest.fixture(scope="session")
def tiny_smollm3_dir(tmp_path_factory):
    """SmolLM3, outside ARCHITECTURES: its own tests use it."""
    return _tiny(tmp_path_factory, "smollm3")


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory):
    """Phi-3: fused qkv_proj and gate_up_proj, a sliding window shorter than the test sequences."""
    return _tiny(tmp_path_factory, "phi3")


@pytest.fixture(scope="session")
def tiny_phi4mini_dir(tmp_path_factory):
    """Phi-4-mini's layout: partial rotary (0.75) with longrope past its original length, tied head."""
    return _tiny(tmp_path_factory, "phi4mini")


@pytest.fixture(scope="session")
def gpu_device():
    """A wgpu device on the best adapter. Lavapipe in CI; a GPU-only test is skipped only where none exists."""
    from engine.backends.wgpu.context import GpuContext, NoAdapterError

    try:
        return GpuContext.create()
    except NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter: {exc}")


@pytest.fixture(autouse=True)
def _join_qt_workers(request):
    """GUI tests: let worker threads end before the next test tears widgets down."""
    yield
    if "qtbot" in request.fixturenames:
        from app.workers import wait_for_workers
        wait_for_workers()


@pytest.fixture(autouse=True)
def _private_backend_speeds(tmp_path_factory, monkeypatch):
    """Backend speeds `auto` caches (engine.backends.measured) go to a folder of each test's own, in training
    child processes too: a test's fake adapters or timings never reach the user's cache, nor another test's."""
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path_factory.mktemp("speeds")))
