import pytest


@pytest.fixture(autouse=True)
def own_data_folder(tmp_path, monkeypatch):
    """Each command test gets a data folder of its own: `lora-lab train` adds its runs to the runs list there
    (engine.train.history), never to the user's."""
    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "lora-lab-home"))
