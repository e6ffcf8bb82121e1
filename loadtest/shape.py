"""The load shape: --shape constant | step | ramp over Locust's own -u, -r and -t, and the User
classes of the run (``classes_of_run``: --protocol when no class is named).

The shape runs on the master (or the only process), once a second. It also records the run's user
count in the options (``hrnet_run_users``), which the master sends to its workers with every spawn
message, so that --target-rps is shared among all the run's users, not each worker's.
"""

from __future__ import annotations

from locust import LoadTestShape

from .users import classes_of_run
from .workload import LoadTestSetupError, check_options, fail_setup


class HrnetShape(LoadTestShape):
    """--shape constant: -u users at -r per second; step: --step-users more every --step-seconds up to
    -u; ramp: 0 to -u users linearly over --ramp-seconds. Every shape ends at -t."""

    use_common_options = True  # the web UI keeps its users, rate and run-time fields

    def tick(self):
        environment = self.runner.environment
        o = environment.parsed_options
        try:
            check_options(o)  # the web UI's form may carry what argparse would have refused
        except LoadTestSetupError as err:
            fail_setup(environment, err)
            return None
        users, rate = o.num_users or 1, o.spawn_rate or 1
        t = self.get_run_time()
        if o.run_time and t >= o.run_time:
            return None  # with a shape class, Locust leaves -t to the shape
        if o.shape == "step":
            users, rate = min(users, o.step_users * (1 + int(t // o.step_seconds))), max(rate, o.step_users)
        elif o.shape == "ramp":
            users, rate = max(1, min(users, round(users * t / o.ramp_seconds))), max(rate, users / o.ramp_seconds)
        o.hrnet_run_users = users
        return users, rate, classes_of_run(environment)
