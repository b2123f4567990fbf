import pytest

from worker.engine import Engine

from .models import SUPPORTED, UNSUPPORTED, write_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny(root / name, make()) for name, make in {**SUPPORTED, **UNSUPPORTED}.items()}


@pytest.fixture(scope="session")
def demo_engine():
    """One demo engine for tests that only read or use prompts of their own."""
    engine = Engine.from_pretrained("demo", device="cpu", device_cache_gb=0.05, host_cache_gb=0.05)
    yield engine
    engine.close()
