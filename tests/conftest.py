"Shared pytest fixtures."
import pytest

@pytest.fixture(scope='module')
def one_torch_thread():
    "On a shared 2-core runner one torch thread is several times faster than two fighting threads."
    torch = pytest.importorskip('torch')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
