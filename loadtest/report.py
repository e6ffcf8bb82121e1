"""The end of a run: one summary line (rate, goodput, latency) and the thresholds that fail it.

Exit status: 0 clean; 1 Locust's own for failed requests; 2 the test could not start, here or on a
worker (hrnet_loadtest.workload); 3 a threshold was crossed (--max-p95-ms, --max-failure-ratio, or a
headless run that made no request).
"""

from __future__ import annotations

import logging

from locust import events
from locust.runners import WorkerRunner

log = logging.getLogger("hrnet.loadtest")


def summary(environment) -> str:
    """E.g. "HRNet_W18_C over HTTP: 336 requests (238 failed), 22.7 requests/s (target 20), goodput …"."""
    o, total = environment.parsed_options, environment.stats.total
    ok = total.num_requests - total.num_failures  # a wrong answer is a failure: ok counts correct answers
    seconds = max(total.last_request_timestamp - total.start_time, 1e-9)
    p50, p95 = total.get_response_time_percentile(0.5), total.get_response_time_percentile(0.95)
    protocols = "+".join(sorted({e.method for e in environment.stats.entries.values() if e.method})) or "-"
    target = f" (open loop, target {o.target_rps:g})" if o.target_rps > 0 else ""
    return (
        f"{o.model} over {protocols}: {total.num_requests} requests ({total.num_failures} failed), "
        f"{total.num_requests / seconds:.1f} requests/s{target}, goodput {ok * o.batch_size / seconds:.1f} images/s "
        f"answered correctly, p50 {p50:.0f} ms, p95 {p95:.0f} ms"
    )


def thresholds_crossed(environment) -> list[str]:
    o, total = environment.parsed_options, environment.stats.total
    crossed = []
    if o.max_p95_ms and total.num_requests and total.get_response_time_percentile(0.95) > o.max_p95_ms:
        crossed.append(f"p95 latency {total.get_response_time_percentile(0.95):.0f} ms > --max-p95-ms {o.max_p95_ms:g}")
    if o.max_failure_ratio >= 0 and total.fail_ratio > o.max_failure_ratio:
        crossed.append(f"failure ratio {total.fail_ratio:.3f} > --max-failure-ratio {o.max_failure_ratio:g}")
    if not total.num_requests and (o.headless or o.autostart):  # a web UI may be closed before any run
        crossed.append("no request was made")
    return crossed


@events.quitting.add_listener
def _report_and_judge(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.process_exit_code == 2:
        return
    o = environment.parsed_options
    if environment.stats.total.num_requests:
        log.info("%s", summary(environment))
    crossed = thresholds_crossed(environment)
    if crossed:
        log.error("threshold crossed: %s", "; ".join(crossed))
        environment.process_exit_code = 3
    elif o.max_failure_ratio >= 0 and environment.process_exit_code is None:
        environment.process_exit_code = 0  # failures within the allowed ratio do not fail the run
