import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.distributed import RankPools  # noqa: E402

torch.set_num_threads(1)
settings.register_profile("ci", max_examples=300, deadline=None)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def ranks():
    """``ranks.run(world_size, fn, *args, timeout=60)``: fn on W gloo ranks, results in rank order."""
    pools = RankPools()
    yield pools
    pools.close()
