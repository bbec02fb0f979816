"""probex.cluster: jobs on a local Ray instance come back in order with their own errors, and a run that cannot use
Ray says why in one line."""
import socket
import sys
from functools import partial

import pytest

from probex.cluster import check_reachable, map_jobs
from probex.errors import InputError, ProbexError
from probex.zoo import select_layers


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_jobs_come_back_in_order_and_a_failing_job_raises_its_own_error(ray_instance):
    pick = partial(select_layers, ["a", "b", "c"])   # a probex function: Ray's workers import it by name
    assert list(map_jobs(pick, ["2", "0", "1"], ray=True, progress=False)) == [["c"], ["a"], ["b"]]
    with pytest.raises(InputError, match="^layer index 7 is out of range: this zoo has 3 layers"):
        list(map_jobs(pick, ["0", "7", "1"], ray=True, progress=False))


def test_asking_for_ray_without_it_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails as if it were not installed
    assert list(map_jobs(abs, [-1, 2], progress=False)) == [1, 2]   # not asked for: not needed
    with pytest.raises(ProbexError, match=r"pip install 'probex\[cluster\]'") as err:
        list(map_jobs(abs, [-1], ray="head:6379", progress=False))
    assert "\n" not in str(err.value)


def test_an_address_nothing_answers_fails_fast_in_one_line():
    with socket.socket() as s:   # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ProbexError, match=f"no Ray cluster answers at 127.0.0.1:{port}") as err:
        check_reachable("127.0.0.1", port)
    assert "\n" not in str(err.value)
