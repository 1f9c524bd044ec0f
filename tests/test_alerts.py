"""Alerts that act (digitkit.serve.alerts): each condition fires when injected and stays quiet on a healthy stream,
minimum sample sizes hold, alerts resolve; the webhook delivers to a local HTTP receiver with bounded retries and
never holds a request; a real server shows the alerts at /v1/alerts, /v1/model and /metrics; the Prometheus rules in
deploy/prometheus/alerts.yml pass `promtool check rules` and `promtool test rules`."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from digitkit.errors import ConfigError
from digitkit.serve.alerts import Alerts, Reference, Webhook, card_accuracy
from digitkit.serve.settings import AlertSettings, from_dict, load
from tests.serving import serve

from .conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL_TIMEOUT_S = 30


# ------------------------------------------------------------------------------------------ helpers
class Receiver:
    """A local HTTP receiver on 127.0.0.1 (its own thread): records every POST; `status` is what it answers, after
    `delay_s`; `hold` (an Event), when set, keeps each handler waiting until it is set."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.status, self.delay_s, self.hold = 200, 0.0, None
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.bodies.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                         **json.loads(raw)})  # fmt: skip
                if outer.hold is not None:
                    outer.hold.wait(10)
                time.sleep(outer.delay_s)
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up (timeout): nobody to answer
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def got(self) -> list[dict]:
        with self.lock:
            return list(self.bodies)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.got()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.got()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def settings(**kw) -> AlertSettings:
    base = {"window": 100, "min_feedback": 50, "min_latency_samples": 20, "min_class_feedback": 10}
    return AlertSettings(**{**base, **kw})


def alerts(events: list | None = None, reference: float | None = 0.99, baseline_ms: float | None = 10.0, **kw
           ) -> Alerts:  # fmt: skip
    sink = events if events is not None else []
    return Alerts(settings(**kw), Reference(reference, "test"), baseline_ms, [str(d) for d in range(10)], "m-1",
                  notify=sink.append)  # fmt: skip


def labels(a: Alerts, right: int, wrong: int, true: str = "3", start: int = 0) -> None:
    for i in range(right + wrong):
        a.observe_feedback(true if i < right else "8", true, key=f"r{start + i}")


# ------------------------------------------------------------------------------------------ the pure logic
def test_a_healthy_stream_stays_quiet():
    events: list = []
    a = alerts(events)
    for i in range(2000):  # latencies around the baseline (under 2x), labels 99.5% right over every class
        a.observe_latency(10.0 + (i % 9))
        a.observe_feedback(str(i % 10) if (i + 1) % 200 else str((i + 1) % 10), str(i % 10), key=str(i))
    snap = a.snapshot()
    assert events == [] and snap["firing"] == []
    assert all(s["value"] is not None for s in snap["alerts"].values()), snap  # every condition was judged
    assert snap["alerts"]["latency"]["count"] == 100 and snap["labels_in_window"] == 100  # bounded windows
    assert snap["alerts"]["accuracy_drop"]["value"] <= 0.5


def test_accuracy_drop_needs_min_feedback_then_fires_with_its_count_and_resolves():
    events: list = []
    a = alerts(events)
    labels(a, right=44, wrong=5)  # 49 labels at 89.8%: far below 99%, but fewer than min_feedback
    state = a.snapshot()["alerts"]["accuracy_drop"]
    assert not state["firing"] and state["value"] is None and state["count"] == 49
    labels(a, right=1, wrong=0, start=49)
    state = a.snapshot()["alerts"]["accuracy_drop"]
    assert state["firing"] and state["count"] == 50 and state["value"] == pytest.approx(9.0)
    drops = [e for e in events if e["alert"] == "accuracy_drop"]  # (class_error judges class 3 too)
    assert [(e["status"], e["count"]) for e in drops] == [("firing", 50)]
    assert drops[0]["detail"]["window_accuracy"] == 0.9 and "50 labels" in drops[0]["summary"]
    labels(a, right=100, wrong=0, start=50)  # the window (100) is all right again
    assert [e["status"] for e in events if e["alert"] == "accuracy_drop"] == ["firing", "resolved"]
    assert a.snapshot()["firing"] == []


def test_accuracy_drop_threshold_is_strict_half_a_point():
    a = alerts(window=200, reference=0.99)
    labels(a, right=197, wrong=3)  # 98.5%: exactly 0.5 points below, not more
    assert a.snapshot()["alerts"]["accuracy_drop"]["firing"] is False
    labels(a, right=0, wrong=1, start=200)  # 98.0%
    assert a.snapshot()["alerts"]["accuracy_drop"]["firing"] is True


def test_no_reference_accuracy_means_no_accuracy_verdict():
    a = alerts(reference=None)
    labels(a, right=0, wrong=100)
    state = a.snapshot()["alerts"]["accuracy_drop"]
    assert not state["firing"] and state["value"] is None and state["count"] == 100


def test_latency_needs_its_samples_then_fires_at_2x_and_resolves():
    events: list = []
    a = alerts(events, baseline_ms=10.0)
    for _ in range(19):
        a.observe_latency(50.0)
    assert a.snapshot()["alerts"]["latency"]["value"] is None and events == []
    a.observe_latency(50.0)
    state = a.snapshot()["alerts"]["latency"]
    assert state["firing"] and state["value"] == 5.0 and state["count"] == 20
    assert events[-1]["alert"] == "latency" and events[-1]["detail"] == {"median_ms": 50.0, "baseline_ms": 10.0}
    for _ in range(21):
        a.observe_latency(10.0)  # the median falls back to 10 ms
    assert events[-1]["status"] == "resolved" and not a.snapshot()["alerts"]["latency"]["firing"]
    b = alerts()
    for _ in range(100):
        b.observe_latency(20.0)  # exactly 2x: not over
    assert not b.snapshot()["alerts"]["latency"]["firing"]
    b.observe_latency(-1.0)
    b.observe_latency(float("nan"))  # nonsense is ignored, not stored
    assert b.snapshot()["latencies_in_window"] == 100


def test_class_error_names_the_classes_over_ten_percent_with_enough_labels():
    events: list = []
    a = alerts(events)
    for i in range(9):
        a.observe_feedback("8", "5", key=f"five{i}")  # class 5 always wrong, but only 9 labels of it
    for i in range(10):
        a.observe_feedback("7" if i else "1", "7", key=f"seven{i}")  # class 7: 10% wrong, not over
    for i in range(30):
        a.observe_feedback(None, "5", key=f"rejected{i}")  # rejected: not a wrong answer, left out
    state = a.snapshot()["alerts"]["class_error"]
    assert not state["firing"] and state["value"] == pytest.approx(0.1) and events == []
    assert state["detail"]["judged_classes"] == ["7"]
    a.observe_feedback("8", "5", key="five9")
    state = a.snapshot()["alerts"]["class_error"]
    assert state["firing"] and state["detail"]["classes"] == {"5": {"error": 1.0, "count": 10}}
    assert state["value"] == 1.0 and state["count"] == 10 and events[-1]["status"] == "firing"
    for i in range(10):
        a.observe_feedback("5", "5", key=f"five{i}")  # the same requests labelled again: replaced, not added
    assert a.snapshot()["labels_in_window"] == 20 and not a.snapshot()["alerts"]["class_error"]["firing"]
    assert events[-1]["alert"] == "class_error" and events[-1]["status"] == "resolved"


def test_windows_stay_bounded_under_a_flood_and_a_failing_notify_never_raises():
    def broken(_):
        raise RuntimeError("receiver exploded")

    a = Alerts(settings(window=50, min_feedback=10, min_class_feedback=10, min_latency_samples=10),
               Reference(0.99, "t"), 1.0, ["0", "1"], notify=broken)  # fmt: skip
    for i in range(20_000):
        a.observe_feedback("0", "1", key=f"k{i}")
        a.observe_latency(100.0)
    snap = a.snapshot()
    assert snap["labels_in_window"] == 50 and snap["latencies_in_window"] == 50
    assert set(snap["firing"]) == {"accuracy_drop", "latency", "class_error"}


def test_reset_on_reload_resolves_what_fired_and_starts_again():
    events: list = []
    a = alerts(events)
    labels(a, right=0, wrong=60)
    assert set(a.snapshot()["firing"]) == {"accuracy_drop", "class_error"}
    a.reset(Reference(0.95, "new card"), 12.0, ["0", "1"], "m-2")
    snap = a.snapshot()
    assert snap["firing"] == [] and snap["labels_in_window"] == 0 and snap["reference_accuracy"] == 0.95
    resolved = [e for e in events if e["status"] == "resolved"]
    assert {e["alert"] for e in resolved} == {"accuracy_drop", "class_error"}
    assert all("model reloaded" in e["summary"] for e in resolved)


def test_card_accuracy_prefers_the_evaluation_of_this_checkpoint(tmp_path):
    metrics = {"test_accuracy": 0.97, "val_accuracy": 0.96}
    assert card_accuracy(tmp_path, metrics, "abc").accuracy == 0.97
    (tmp_path / "eval" / "test").mkdir(parents=True)
    ev = tmp_path / "eval" / "test" / "metrics.json"
    ev.write_text(json.dumps({"accuracy": 0.985, "checkpoint_sha256": "abc"}))
    assert card_accuracy(tmp_path, metrics, "abc") == Reference(0.985, "eval/test/metrics.json (digitkit evaluate)")
    assert card_accuracy(tmp_path, metrics, "other").accuracy == 0.97  # an evaluation of another checkpoint
    assert card_accuracy(None, {"val_accuracy": 0.96}, "x").source.startswith("summary.json val_accuracy")
    assert card_accuracy(None, {}, "x").accuracy is None
    assert card_accuracy(tmp_path, metrics, "abc", override=0.9) == Reference(0.9, "alerts.reference_accuracy")


@pytest.mark.parametrize(("raw", "words"), [
    ({"window": 0}, ["alerts.window", "whole number"]),
    ({"min_feedback": 2000}, ["alerts.min_feedback", "exceeds alerts.window"]),
    ({"accuracy_drop_points": -1}, ["accuracy_drop_points", "percentage points"]),
    ({"reference_accuracy": 98}, ["reference_accuracy", "(0, 1]"]),
    ({"latency_ratio": 1}, ["latency_ratio", "above 1"]),
    ({"class_error": 1.5}, ["class_error", "0.1 for 10%"]),
    ({"webhook_tries": 50}, ["webhook_tries", "at most 10"]),
    ({"webhook_timeout_s": 0}, ["webhook_timeout_s", "seconds"]),
    ({"webhook_url": "ftp://example.com/hook?token=s3cret"}, ["scheme is 'ftp'", "http or https"]),
    ({"webhook_url": "https:///hook"}, ["no host"]),
    ({"webhook_url": "http://example.com:99999/"}, ["not a valid URL"]),
    ({"webhook_url": "http://exa mple.com/"}, ["control characters"]),
    ({"wbhook_url": "http://x/"}, ["unknown config key", "webhook_url"]),
])  # fmt: skip
def test_alert_settings_say_what_was_wrong_and_what_was_expected(raw, words):
    with pytest.raises(ConfigError) as err:
        from_dict({"alerts": raw})
    text = str(err.value)
    assert all(w in text for w in words), text
    assert "s3cret" not in text  # a webhook URL may carry a token: never repeated


def test_webhook_url_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITKIT_ALERT_WEBHOOK_URL", "https://hooks.example.com/T0/B0/XYZ")
    s = load(None, {}, {})
    assert s.alerts.webhook_url == "https://hooks.example.com/T0/B0/XYZ" and "XYZ" not in repr(s)
    monkeypatch.setenv("DIGITKIT_ALERT_WEBHOOK_URL", "file:///etc/passwd")
    with pytest.raises(ConfigError, match="DIGITKIT_ALERT_WEBHOOK_URL"):
        load(None, {}, {})


# ------------------------------------------------------------------------------------------ the webhook
def fast_hook(url: str, **kw) -> Webhook:
    return Webhook(url, AlertSettings(**{"webhook_backoff_s": 0.05, "webhook_timeout_s": 1.0, **kw}))


def test_webhook_posts_json_to_a_local_receiver(receiver):
    hook = fast_hook(receiver.url)
    try:
        hook.send({"alert": "latency", "status": "firing", "value": 3.0})
        got = receiver.wait_for(1)
        assert got == [{"path": "/hook?token=secret-token", "type": "application/json", "alert": "latency",
                        "status": "firing", "value": 3.0}]  # fmt: skip
        deadline = time.monotonic() + 5
        while hook.outcomes["delivered"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hook.outcomes == {"delivered": 1, "failed": 0, "dropped": 0, "retried": 0}
        assert "secret-token" not in hook.where
    finally:
        hook.close()


def wait_outcome(hook: Webhook, key: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while hook.outcomes[key] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hook.outcomes[key] >= n, hook.outcomes


def test_a_failing_receiver_gets_bounded_retries_and_send_never_blocks(receiver, caplog):
    receiver.status, receiver.delay_s = 500, 0.2
    hook = fast_hook(receiver.url, webhook_tries=3)
    try:
        t0 = time.perf_counter()
        hook.send({"alert": "accuracy_drop", "status": "firing"})
        assert time.perf_counter() - t0 < 0.05  # queued, not sent, in the caller's thread
        wait_outcome(hook, "failed", 1)
        time.sleep(0.3)  # no fourth attempt comes late
        assert len(receiver.got()) == 3
        assert hook.outcomes == {"delivered": 0, "failed": 1, "dropped": 0, "retried": 2}
        assert "not delivered after 3 attempt(s) (HTTP 500)" in caplog.text and "secret-token" not in caplog.text
        receiver.status = 404  # a client error is not retried
        hook.send({"alert": "latency", "status": "firing"})
        wait_outcome(hook, "failed", 2)
        assert len(receiver.got()) == 4
    finally:
        hook.close()


def test_a_hanging_receiver_times_out_and_an_unreachable_one_fails(receiver):
    receiver.delay_s = 1.0  # answers after the sender's timeout
    hook = fast_hook(receiver.url, webhook_tries=2, webhook_timeout_s=0.2)
    try:
        hook.send({"alert": "latency", "status": "firing"})
        wait_outcome(hook, "failed", 1, timeout=5)
        assert len(receiver.got()) == 2 and hook.outcomes["retried"] == 1
    finally:
        hook.close()
    port = receiver.server.server_address[1]
    receiver.close()
    gone = fast_hook(f"http://127.0.0.1:{port}/hook", webhook_tries=2)
    try:
        gone.send({"alert": "latency", "status": "firing"})
        wait_outcome(gone, "failed", 1, timeout=5)
    finally:
        gone.close()
    receiver.close = lambda: None  # already closed


def test_a_full_queue_drops_the_oldest_and_counts_it(receiver):
    receiver.hold = threading.Event()  # the first delivery hangs until released
    hook = fast_hook(receiver.url, webhook_queue=2, webhook_timeout_s=5.0)
    try:
        hook.send({"alert": "n0", "status": "firing"})
        receiver.wait_for(1)  # n0 is in flight, the queue empty
        for i in range(1, 5):
            hook.send({"alert": f"n{i}", "status": "firing"})
        assert hook.pending() == 2 and hook.outcomes["dropped"] == 2
        receiver.hold.set()
        got = receiver.wait_for(3)
        assert [b["alert"] for b in got] == ["n0", "n3", "n4"]
        t0 = time.perf_counter()
    finally:
        receiver.hold.set()
        hook.close()
    assert time.perf_counter() - t0 < 3


# ------------------------------------------------------------------------------------------ Prometheus rules
def test_the_rules_file_passes_promtool_check_rules(promtool, tmp_path):
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout
    broken = tmp_path / "broken.yml"  # the check can fail: a rule with a bad expression is caught
    broken.write_text(RULES.read_text().replace('== 1\n        for: 5m', '== = 1\n        for: 5m', 1))
    bad = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True,
                         timeout=PROMTOOL_TIMEOUT_S)  # fmt: skip
    assert bad.returncode != 0


def rule_tests(rules: dict) -> dict:
    """A `promtool test rules` spec: an instance whose accuracy_drop fires and holds, a 3-minute class_error blip
    (under the rule's `for: 5m`), a failed webhook delivery, and a healthy instance."""
    annotations = {r["alert"]: r["annotations"] for g in rules["groups"] for r in g["rules"]}

    def alert(name: str, instance: str, severity: str) -> dict:
        return {"exp_labels": {"severity": severity, "instance": instance},
                "exp_annotations": {k: v.replace("{{ $labels.instance }}", instance)
                                    for k, v in annotations[name].items()}}  # fmt: skip

    series = {'digitkit_alert_firing{alert="accuracy_drop", instance="sick"}': "0 0 1x20",
              'digitkit_alert_firing{alert="class_error", instance="sick"}': "0x2 1x2 0x20",
              'digitkit_alert_firing{alert="latency", instance="healthy"}': "0x22",
              'digitkit_alert_firing{alert="accuracy_drop", instance="healthy"}': "0x22",
              'digitkit_model_loaded{instance="healthy"}': "1x22",
              'digitkit_alert_webhooks_total{outcome="failed", instance="sick"}': "0 0 0 1 1 1"}  # fmt: skip
    checks = [(10, "DigitkitAccuracyDrop", [alert("DigitkitAccuracyDrop", "sick", "page")]),
              (10, "DigitkitClassError", []), (20, "DigitkitLatencyHigh", []), (20, "DigitkitModelNotLoaded", []),
              (5, "DigitkitAlertWebhookFailing", [alert("DigitkitAlertWebhookFailing", "sick", "warn")])]  # fmt: skip
    return {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": [{"eval_time": f"{t}m", "alertname": n, "exp_alerts": exp} for t, n, exp in checks],
    }]}  # fmt: skip


def test_the_rules_fire_on_a_sick_gauge_and_stay_quiet_on_a_healthy_one(promtool, tmp_path):
    """`promtool test rules`: accuracy_drop held 8 minutes fires (for: 5m); a 3-minute class_error blip does not;
    the healthy instance raises nothing; a failed webhook delivery does."""
    import yaml

    spec = rule_tests(yaml.safe_load(RULES.read_text()))
    exp = spec["tests"][0]["alert_rule_test"][0]["exp_alerts"][0]["exp_annotations"]
    assert exp["summary"] == "digitkit accuracy on labelled feedback fell below the model card's figure on sick"
    path = tmp_path / "rules_test.yml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    spec["tests"][0]["alert_rule_test"][1]["exp_alerts"] = [{"exp_labels": {"severity": "warn", "instance": "sick"}}]
    path.write_text(json.dumps(spec))  # the test can fail: expecting the blip to fire is refuted
    assert subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S).returncode != 0  # fmt: skip


# ------------------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def one_digit():
    """A test image of a 3 as pixel rows."""
    from digitkit import data

    from .conftest import MNIST_DIR

    test = data.load_split(MNIST_DIR, "test")
    i = int((test.labels == 3).nonzero()[0][0])
    return test.images[i, 0].numpy().tolist()


@pytest.fixture(scope="module")
def hook_receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def alert_server(mnist_small_run, tmp_path_factory, hook_receiver):
    tmp = tmp_path_factory.mktemp("alerts")
    cfg = tmp / "settings.yaml"
    cfg.write_text(textwrap.dedent("""\
        alerts:
          window: 40
          min_feedback: 20
          min_class_feedback: 8
          min_latency_samples: 20
          webhook_tries: 3
          webhook_backoff_s: 0.05
          webhook_timeout_s: 0.5
        """))
    env = {"DIGITKIT_ALERT_WEBHOOK_URL": hook_receiver.url}
    with serve(mnist_small_run, tmp, "--settings", str(cfg), "--audit-db", str(tmp / "audit.db"), env=env) as srv:
        yield srv


def label_stream(c, pixels, n: int, true_label: str | None) -> str:
    """`n` predictions of the image, each labelled `true_label` (None: what the model said); returns the answer."""
    digit = None
    for _ in range(n):
        r = c.post("/v1/predict", json={"pixels": pixels})
        assert r.status_code == 200, r.text
        digit = r.json()["digit"]
        t0 = time.perf_counter()
        fb = c.post("/v1/feedback", json={"request_id": r.json()["request_id"], "true_label": true_label or digit})
        assert fb.status_code == 200 and time.perf_counter() - t0 < 2.0, fb.text  # never held by the webhook
    return digit


def firing_gauges(text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'^digitkit_alert_firing\{alert="(\w+)"\} (\S+)$', text, re.M)}


def test_a_real_server_quiet_then_firing_then_resolved_with_webhook_posts(alert_server, hook_receiver, one_digit):
    hook_receiver.status = 200
    with alert_server.client() as c:
        digit = label_stream(c, one_digit, 40, None)  # healthy: every label agrees (fills the window of 40)
        assert digit == "3"
        state = c.get("/v1/alerts").json()
        assert state["firing"] == [] and state["labels_in_window"] == 40, state
        assert state["alerts"]["accuracy_drop"]["count"] == 40 and state["alerts"]["accuracy_drop"]["value"] < 0
        assert state["reference_source"].startswith("summary.json") and 0.9 < state["reference_accuracy"] <= 1
        assert firing_gauges(c.get("/metrics").text) == {"accuracy_drop": 0.0, "latency": 0.0, "class_error": 0.0}
        time.sleep(0.3)
        before = len(hook_receiver.got())
        assert before == 0 or all(b["status"] == "resolved" for b in hook_receiver.got())  # nothing fired

        wrong = "5"
        label_stream(c, one_digit, 30, wrong)  # the window: 10 right, 30 wrong, all 30 of true class 5
        state = c.get("/v1/alerts").json()
        assert set(state["firing"]) == {"accuracy_drop", "class_error"}, state
        drop = state["alerts"]["accuracy_drop"]
        assert drop["count"] == 40 and drop["value"] > 50 and drop["detail"]["window_accuracy"] == 0.25
        assert state["alerts"]["class_error"]["detail"]["classes"] == {"5": {"error": 1.0, "count": 30}}
        assert state["webhook"]["url"].startswith("http://127.0.0.1:") and "token" not in state["webhook"]["url"]
        assert c.get("/v1/model").json()["alerts"]["firing"] == state["firing"]
        metrics = c.get("/metrics").text
        assert firing_gauges(metrics) == {"accuracy_drop": 1.0, "latency": 0.0, "class_error": 1.0}
        assert re.search(r'^digitkit_alert_value\{alert="class_error"\} 1\.0$', metrics, re.M)
        assert re.search(r'^digitkit_alert_samples\{alert="accuracy_drop"\} 40\.0$', metrics, re.M)
        got = hook_receiver.wait_for(before + 2)[before:]
        assert sorted((b["alert"], b["status"]) for b in got) == [("accuracy_drop", "firing"),
                                                                  ("class_error", "firing")]  # fmt: skip
        assert all(b["path"] == "/hook?token=secret-token" and b["model_version"] for b in got)

        label_stream(c, one_digit, 40, None)  # healthy again: both resolve
        assert c.get("/v1/alerts").json()["firing"] == []
        got = hook_receiver.wait_for(before + 4)[before + 2:]
        assert sorted((b["alert"], b["status"]) for b in got) == [("accuracy_drop", "resolved"),
                                                                  ("class_error", "resolved")]  # fmt: skip
        assert "accuracy_drop fired" in alert_server.log()


def test_a_real_server_with_a_failing_receiver_retries_a_bounded_number_of_times(alert_server, hook_receiver,
                                                                                  one_digit):  # fmt: skip
    with alert_server.client() as c:
        label_stream(c, one_digit, 40, None)  # start quiet, whatever ran before
        time.sleep(0.3)
        before = len(hook_receiver.got())
        failed_before = c.get("/v1/alerts").json()["webhook"]["failed"]
        hook_receiver.status, hook_receiver.delay_s = 503, 0.0
        try:
            label_stream(c, one_digit, 30, "5")  # fires accuracy_drop and class_error: 2 messages
            time.sleep(1.0)  # 3 attempts each, 0.05 s and 0.1 s apart
            attempts = hook_receiver.got()[before:]
            assert len(attempts) == 6, attempts
            state = c.get("/v1/alerts").json()
            assert set(state["firing"]) == {"accuracy_drop", "class_error"}
            assert state["webhook"]["failed"] == failed_before + 2 and state["webhook"]["pending"] == 0
            metrics = c.get("/metrics").text
            assert re.search(r'^digitkit_alert_webhooks_total\{outcome="failed"\} [1-9]', metrics, re.M)
            assert c.get("/readyz").status_code == 200
        finally:
            hook_receiver.status = 200
            label_stream(c, one_digit, 40, None)


def test_every_metric_the_rules_use_is_exported(alert_server):
    with alert_server.client() as c:
        exported = set(re.findall(r"^# TYPE (\S+) ", c.get("/metrics").text, re.M))
    exported |= {n.removesuffix("_total") + "_total" for n in exported}  # counters: the family and its samples
    used = set(re.findall(r"\b(digitkit_[a-z_]+)\b", RULES.read_text())) - {"digitkit_alert_webhooks"}
    assert used and used <= exported, used - exported


def test_alert_state_survives_a_model_reload_as_a_fresh_start(mnist_small_run, tmp_path, one_digit):
    """Admin reload: the windows start again for the new model."""
    admin = "admin-token-0123456789"
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("alerts:\n  window: 20\n  min_feedback: 10\n  min_class_feedback: 5\n  min_latency_samples: 10\n")
    with serve(mnist_small_run, tmp_path, "--settings", str(cfg), "--audit-db", str(tmp_path / "a.db"),
               env={"DIGITKIT_ADMIN_TOKEN": admin}) as srv, srv.client() as c:  # fmt: skip
        label_stream(c, one_digit, 12, "5")
        assert set(c.get("/v1/alerts").json()["firing"]) == {"accuracy_drop", "class_error"}
        assert c.post("/v1/admin/reload", headers={"X-Admin-Token": admin}).status_code == 200
        state = c.get("/v1/alerts").json()
        assert state["firing"] == [] and state["labels_in_window"] == 0
        assert "resolved: model reloaded" in srv.log()


def test_the_latency_median_is_the_windows_median_at_every_step():
    """The window is kept sorted as answers come and go (no sort per answer): its median must be statistics.median
    of exactly the last `window` latencies, repeats and evictions included, and a reset empties it."""
    import random
    import statistics

    settings = AlertSettings(window=7, min_latency_samples=1, min_feedback=1, min_class_feedback=1)
    alerts = Alerts(settings, Reference(0.99, "test"), 1.0, list("0123456789"))
    rng = random.Random(0)
    seen: list[float] = []
    for _ in range(200):
        v = rng.choice([0.5, 1.0, 1.0, 2.5, rng.random() * 4])  # repeats on purpose
        alerts.observe_latency(v)
        seen.append(v)
        detail = alerts.snapshot()["alerts"]["latency"]["detail"]
        assert detail["median_ms"] == round(statistics.median(seen[-7:]), 3)
    alerts.reset(Reference(0.99, "test"), 1.0, list("0123456789"), "v2")
    alerts.observe_latency(3.0)
    assert alerts.snapshot()["alerts"]["latency"]["detail"]["median_ms"] == 3.0
