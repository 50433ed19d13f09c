"""The command line as a user meets it: `tapio validate` / `tapio run` on hostile configs.

Each case runs the real `tapio` executable and checks the exit status (1, as the OpenTelemetry Collector),
the message, and that it names file:line:column and the key path, without
a traceback.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tapio.testing.process import tapio_command

GOOD = """\
receivers:
  otlp:
    protocols:
      http: {endpoint: "127.0.0.1:4318"}
processors:
  batch: {}
exporters:
  debug: {}
service:
  pipelines:
    logs: {receivers: [otlp], processors: [batch], exporters: [debug]}
"""


def tapio(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([*tapio_command(), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


def check_config(tmp_path: Path, text: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return tapio(*args or ("validate",), "-c", str(path), env=env)


CASES = [
    # (what, yaml edit: (old, new), expected fragment with location)
    ("unknown type", ("  batch: {}", "  bacth: {}"), r"pipelines.yaml:6:3: processors.bacth: unknown processor type 'bacth'; did you mean 'batch'? (registered: batch"),
    ("unknown key", ("  debug: {}", "  debug: {verbosty: basic}"), r"pipelines.yaml:8:11: exporters.debug.verbosty: unknown key 'verbosty'; did you mean 'verbosity'?"),
    ("bad duration", ("  batch: {}", "  batch: {timeout: 5x}"), r"pipelines.yaml:6:20: processors.batch.timeout: invalid duration '5x': expected a number with a unit"),
    ("negative size", ("  batch: {}", "  batch: {send_batch_size: -5}"), r"pipelines.yaml:6:28: processors.batch.send_batch_size: must be >= 0, got -5"),
    ("port out of range", ('"127.0.0.1:4318"', '"127.0.0.1:70000"'), r"pipelines.yaml:4:24: receivers.otlp.protocols.http.endpoint: port 70000 is out of range (0-65535; 0 picks a free port)"),
    ("bad host", ('"127.0.0.1:4318"', '"a$b:4318"'), r"pipelines.yaml:4:24: receivers.otlp.protocols.http.endpoint: host 'a$b' is neither an IP address nor a valid host name"),
    ("undefined component", ("exporters: [debug]}", "exporters: [debgu]}"), r"pipelines.yaml:11:64: service.pipelines.logs.exporters[0]: exporter 'debgu' is not defined in exporters; did you mean 'debug'?"),
    ("signal not supported", ("  debug: {}", "  debug: {}\n  prometheus: {}"), None),
    ("mistyped value", ("  batch: {}", "  batch: {send_batch_size: lots}"), r"pipelines.yaml:6:28: processors.batch.send_batch_size: expected an integer, got 'lots'"),
]


@pytest.mark.parametrize("what,edit,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_config_is_reported_with_location(tmp_path, what, edit, expected):
    old, new = edit
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if what == "signal not supported":
        text = text.replace("exporters: [debug]}", "exporters: [debug, prometheus]}")
        expected = "pipelines.yaml:12:71: service.pipelines.logs.exporters[1]: exporter 'prometheus' does not support logs"
    res = check_config(tmp_path, text)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [line.removeprefix("tapio: ").replace(str(tmp_path) + "/", "") for line in res.stderr.splitlines()]
    assert any(line.startswith(expected) for line in lines), "\n".join(lines)
    # tapio run refuses the same config the same way, starting nothing
    res_run = check_config(tmp_path, text, "run")
    assert res_run.returncode == 1 and res_run.stderr == res.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    bad = GOOD.replace("  batch: {}", "  batch: {timeout: 5x}").replace("exporters: [debug]}", "exporters: [nope]}").replace("  debug: {}", "  debug: {verbosity: loud}")
    res = check_config(tmp_path, bad)
    assert res.returncode == 1
    assert "processors.batch.timeout" in res.stderr
    assert "service.pipelines.logs.exporters[0]" in res.stderr
    assert "exporters.debug.verbosity" in res.stderr
    assert "the configuration has 3 errors" in res.stderr


def test_yaml_syntax_error_and_missing_file(tmp_path):
    res = check_config(tmp_path, GOOD + "  oops: [unclosed\n")
    assert res.returncode == 1 and "pipelines.yaml:" in res.stderr and "Traceback" not in res.stderr
    res = tapio("validate", "-c", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "missing.yaml" in res.stderr and "Traceback" not in res.stderr


def test_unused_component_is_a_warning_not_an_error(tmp_path):
    res = check_config(tmp_path, GOOD.replace("  debug: {}", "  debug: {}\n  debug/spare: {}"))
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "debug/spare" in res.stderr


def test_env_expansion_and_merge(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(GOOD.replace('"127.0.0.1:4318"', '"127.0.0.1:${env:TEST_PORT:-4318}"'))
    override = tmp_path / "override.yaml"
    override.write_text("processors:\n  batch:\n    timeout: $${env:NOT_EXPANDED}\n")
    res = tapio("validate", "-c", str(base), "-c", str(override), env={"TEST_PORT": "99999"})
    assert res.returncode == 1
    # the escaped $$ became a literal "${env:NOT_EXPANDED}", reported as a bad duration from the second file
    assert "override.yaml:3:14: processors.batch.timeout: invalid duration '${env:NOT_EXPANDED}'" in res.stderr
    assert "base.yaml:4:24: receivers.otlp.protocols.http.endpoint: port 99999 is out of range" in res.stderr
    res = tapio("validate", "-c", str(base), env={"TEST_PORT": "4319"})
    assert res.returncode == 0, res.stderr


def test_secrets_never_appear_in_output(tmp_path):
    """An auth header set in the config shows neither in `validate` nor in `run`'s start banner or logs."""
    from tapio.testing.process import TapioProcess, free_port

    metrics = free_port()
    cfg = tmp_path / "secret.yaml"
    cfg.write_text(GOOD.replace('"127.0.0.1:4318"', f'"127.0.0.1:{free_port()}"').replace("  debug: {}", """  debug: {}
  otlphttp:
    endpoint: http://127.0.0.1:1
    headers: {authorization: "Bearer hunter2-token"}""").replace("exporters: [debug]}", "exporters: [debug, otlphttp]}")
        + f"  telemetry: {{metrics: {{address: '127.0.0.1:{metrics}'}}, logs: {{level: debug}}}}\n")
    res = tapio("validate", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        t.signal()
        t.wait_exit()
        output = t.stderr
    assert "otlphttp" in output  # the banner names the exporter...
    assert "hunter2" not in output and "hunter2" not in res.stdout + res.stderr  # ...never its credentials

    from tapio.config import decode_dataclass
    from tapio.exporters.otlp import HttpExporterConfig

    assert "hunter2" not in repr(decode_dataclass(HttpExporterConfig, {"endpoint": "http://x:1", "headers": {"authorization": "hunter2"}}))


def test_file_exporter_path_that_cannot_be_created_is_a_config_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    text = GOOD.replace("  debug: {}", f"  debug: {{}}\n  file:\n    path: {blocker}/out/logs.jsonl").replace(
        "exporters: [debug]}", "exporters: [debug, file]}"
    )
    res = check_config(tmp_path, text)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [line.removeprefix("tapio: ").replace(str(tmp_path) + "/", "") for line in res.stderr.splitlines()]
    expected = f"pipelines.yaml:10:11: exporters.file.path: cannot create the directory '{blocker}/out': '{blocker}' is not a directory"
    assert expected.replace(str(tmp_path) + "/", "") in lines, "\n".join(lines)


# ---------------------------------------------------------------- the OpenTelemetry Collector's --config URIs and --set


def test_config_uris_file_env_and_yaml_merge_in_order_and_set_comes_last(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(GOOD)
    env = {"TAPIO_TEST_CONFIG": "processors:\n  batch: {timeout: 3s, send_batch_size: 100}\n"}
    res = tapio(
        "graph", "-c", f"file:{base}", "-c", "env:TAPIO_TEST_CONFIG",
        "-c", "yaml:exporters::debug/two::verbosity: detailed",
        "-c", "yaml:service::pipelines::logs::exporters: [debug, debug/two]",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert 'exporter debug/two' in res.stdout  # the yaml: sources added an exporter and rewired the pipeline
    # each source is reported by its own name, later sources and then --set win
    res = tapio(
        "validate", "-c", str(base), "-c", "env:TAPIO_TEST_CONFIG", "--set", "processors::batch::send_batch_max_size=50",
        env=env,
    )
    assert res.returncode == 1
    assert "--set processors::batch::send_batch_max_size=50:1:1: processors.batch.send_batch_max_size: must be 0 or >= send_batch_size (100), got 50" in res.stderr
    res = tapio("validate", "-c", str(base), "-c", "env:TAPIO_TEST_CONFIG", "--set", "processors::batch::send_batch_size=10",
                "--set", "processors::batch::send_batch_max_size=50", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{base}, env:TAPIO_TEST_CONFIG, --set processors::batch::send_batch_size=10, ")


def test_a_problem_in_an_env_or_yaml_source_names_it(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(GOOD)
    res = tapio("validate", "-c", str(base), "-c", "env:TAPIO_TEST_CONFIG", env={"TAPIO_TEST_CONFIG": "exporters:\n  debug: {verbosty: basic}\n"})
    assert res.returncode == 1
    assert "env:TAPIO_TEST_CONFIG:2:11: exporters.debug.verbosty: unknown key 'verbosty'; did you mean 'verbosity'?" in res.stderr
    res = tapio("validate", "-c", str(base), "-c", "yaml:processors::batch::timeout: 5x")
    assert res.returncode == 1 and "processors.batch.timeout: invalid duration '5x'" in res.stderr


@pytest.mark.parametrize("args, message", [
    (("-c", "env:TAPIO_NOT_SET_ANYWHERE"), "env:TAPIO_NOT_SET_ANYWHERE: environment variable 'TAPIO_NOT_SET_ANYWHERE' is not set"),
    (("-c", "https://config.example/pipelines.yaml"), "config source scheme 'https' is not supported; use a file path, file:PATH, env:NAME or yaml:TEXT"),
    (("-c", "file:/nonexistent/pipelines.yaml"), "/nonexistent/pipelines.yaml: cannot read config file: No such file or directory"),
    (("--set", "processors.batch.timeout=1s"), "nested keys are joined with '::', not '.'"),
    (("--set", "processors::batch::timeout"), "--set processors::batch::timeout: expected key=value"),
    (("--set", "processors::batch::timeout=lots"), "processors.batch.timeout: invalid duration 'lots'"),
])
def test_a_bad_source_or_set_exits_1_as_the_collector_does(tmp_path, args, message):
    base = tmp_path / "base.yaml"
    base.write_text(GOOD)
    for command in ("validate", "run"):
        res = tapio(command, "-c", str(base), *args)
        assert res.returncode == 1, (command, res.stdout, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr


def test_usage_errors_exit_2():
    res = tapio("run", "--no-such-option")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-option" in res.stderr
    res = tapio("run", "--watch", "0")
    assert res.returncode == 2 and "expected between 0.1 and 3600 seconds, got 0" in res.stderr
