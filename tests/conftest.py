"""Shared fixtures: tiny models and task data made on the spot (the hub is unreachable)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models are dominated by per-op overhead; one intra-op thread is faster and steadier
    # than two competing ones on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def debug_model(tmp_path_factory):
    from reflow.models.presets import init_model

    return init_model("debug-llama", tmp_path_factory.mktemp("debug-llama"), seed=0)


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    from reflow.data.tasks import write_task

    out = tmp_path_factory.mktemp("addition")
    write_task("addition", out, n_train=200, n_test=16, seed=0, min_digits=2, max_digits=2)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One Ray session for every multi-worker test (starting Ray costs seconds); 4 CPUs for 4 workers."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
