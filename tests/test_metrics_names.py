"""/metrics passes Prometheus' own linter (`promtool check metrics`, Debian package `prometheus`): the text of a real
server after predictions, a cache hit, feedback and a rejection, and the multiprocess form `--workers N` serves;
and the README lists exactly the metric families the server exports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.serving import serve

from .conftest import ROOT

PROMTOOL_TIMEOUT_S = 30
UNIT_SUFFIXES = ("_ms", "_milliseconds", "_us", "_microseconds", "_kb", "_mb", "_percent")


def check(promtool: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S)  # fmt: skip


def families(text: str) -> dict[str, str]:
    """{family name: type} from the # TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def scraped(mnist_small_run, tmp_path_factory) -> str:
    """/metrics of a real server after answers, a cache hit, a rejection, feedback and a 4xx."""
    from digitkit import data

    from .conftest import MNIST_DIR

    test = data.load_split(MNIST_DIR, "test")
    images = test.images[:6, 0].numpy()
    tmp = tmp_path_factory.mktemp("promtool")
    with serve(mnist_small_run, tmp, "--audit-db", str(tmp / "audit.db")) as srv, srv.client() as c:
        ids = [c.post("/v1/predict", json={"pixels": im.tolist()}).json()["request_id"] for im in images]
        assert c.post("/v1/predict", json={"pixels": images[0].tolist()}).json()["cached"] is True
        blank = c.post("/v1/predict", json={"pixels": np.zeros((28, 28)).tolist()}).json()
        assert blank["digit"] is None and blank["rejected"]
        assert c.post("/v1/feedback", json={"request_id": ids[0], "true_label": str(int(test.labels[0]))}
                      ).status_code == 200  # fmt: skip
        assert c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        return c.get("/metrics").text


def test_a_real_servers_metrics_pass_promtool(promtool, scraped):
    done = check(promtool, scraped)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        f"promtool check metrics failed:\n{done.stdout}{done.stderr}")  # fmt: skip
    found = families(scraped)
    # What was observed is there, under base-unit names.
    for name in ("digitkit_requests_total", "digitkit_request_latency_seconds", "digitkit_predictions_total",
                 "digitkit_rejections_total", "digitkit_feedback_total", "digitkit_live_accuracy",
                 "digitkit_window_median_latency_seconds", "digitkit_client_disconnects_total",
                 "digitkit_alert_firing", "digitkit_alert_threshold", "digitkit_alert_samples"):  # fmt: skip
        assert name in found, f"{name} not in /metrics"
    assert found["digitkit_client_disconnects_total"] == "counter"
    assert not [n for n in found if n.endswith(UNIT_SUFFIXES) or "_ms_" in n], found
    median = float(re.search(r"^digitkit_window_median_latency_seconds (\S+)$", scraped, re.M)[1])
    assert 0 < median < 1, f"the median latency should be in seconds, got {median}"
    assert re.search(r'^digitkit_requests_total\{route="/v1/predict",status="400"\} 1\.0$', scraped, re.M)
    assert re.search(r"^digitkit_drift_baseline_measured 1\.0$", scraped, re.M)
    for alert in ("accuracy_drop", "latency", "class_error"):  # digitkit.serve.alerts: one series per alert
        assert re.search(rf'^digitkit_alert_firing\{{alert="{alert}"\}} 0\.0$', scraped, re.M), alert


def test_promtool_does_catch_a_bad_name(promtool):
    """The check above can fail: the name the server used to export is flagged."""
    bad = "# HELP digitkit_window_median_latency_ms Median latency\n# TYPE digitkit_window_median_latency_ms gauge\n" \
          "digitkit_window_median_latency_ms 2.0\n"  # fmt: skip
    done = check(promtool, bad)
    assert done.returncode != 0 and "abbreviated units" in done.stdout + done.stderr


MULTIPROCESS = textwrap.dedent("""
    import sys
    from prometheus_client.metrics import MetricWrapperBase
    from digitkit.serve.metrics import Metrics
    m = Metrics()
    for metric in vars(m).values():  # one sample in every counter and histogram, whatever their names and labels
        if isinstance(metric, MetricWrapperBase):
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
            child.observe(0.004) if hasattr(child, "observe") else child.inc()
    m.observe_answer("3", 0.97, None, False)
    m.observe_answer(None, 0.0, "empty", True)
    m.feedback.inc()
    m.set_live(digitkit_live_accuracy=1.0, digitkit_labelled_predictions=1, digitkit_window_mean_confidence=0.97,
               digitkit_window_rejection_rate=0.5, digitkit_window_median_latency_seconds=0.004,
               digitkit_model_loaded=1, digitkit_drift_baseline_measured=0,
               drift_alert={"class_shift": False}, drift_value={"class_shift": 0.1}, model_version="m-0123",
               alerts={"latency": {"firing": True, "value": 2.5, "threshold": 2.0, "count": 60}},
               alert_webhook={"delivered": 1, "failed": 0, "dropped": 0, "retried": 0})
    sys.stdout.write(m.render().decode())
""")


def test_the_multiprocess_form_passes_promtool_too(promtool, tmp_path, scraped):
    """`--workers N` aggregates through PROMETHEUS_MULTIPROC_DIR, which renders differently (no _created series)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", MULTIPROCESS], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "digitkit_client_disconnects_total" in done.stdout
    assert 'digitkit_alert_firing{alert="latency"} 1.0' in done.stdout
    assert 'digitkit_alert_webhooks_total{outcome="delivered"} 1.0' in done.stdout
    lint = check(promtool, done.stdout)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The same families in both forms (apart from the per-process _created gauges of prometheus_client).
    single = {n for n in families(scraped) if not n.endswith("_created")}
    assert single <= set(families(done.stdout)), single - set(families(done.stdout))


def test_the_readme_lists_exactly_the_exported_metrics(scraped):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Monitoring and drift.**", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(digitkit_[a-z_]+)", section))
    exported = {n for n in families(scraped) if not n.endswith("_created")}
    assert listed == exported, f"README only: {sorted(listed - exported)}; /metrics only: {sorted(exported - listed)}"
