"""``python -m pdserve.bench`` end to end: bad input exits 2 with one line; a real run's outputs."""

from __future__ import annotations

import sys

import pytest
from testkit import free_port

from pdserve.bench.cli import main
from pdserve.bench.fake_server import FakeServerThread, Pace
from pdserve.bench.report import load_report, recompute_summaries


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "127.0.0.1:{port}", "--connect-timeout", "3"], "cannot connect to pdserve"),
        (["--slo", "ttft=500"], "bad SLO value '500'"),
        (["--slo", "speed=5ms"], "unknown SLO key 'speed'"),
        (["--workload", "sharegpt"], "invalid choice: 'sharegpt'"),
        (["--rate", "0"], "request rate must be > 0"),
        (["--rate", "-2"], "request rate must be > 0"),
        (["--rates", "1,0"], "request rate must be > 0"),
        (["--rates", "1,fast"], "--rates must be numbers"),
        (["--rate", "1", "--rates", "1,2"], "not allowed with argument"),
        (["--workload", "file", "--dataset", "/nonexistent/x.json"], "dataset file not found"),
        (["--compare", "/nonexistent/a.yaml"], "cluster config not found"),
        (["--target", "localhost"], "--target must be HOST:PORT"),
        (["--input-len", "9:3"], "--input-len must satisfy"),
        (["--num-requests", "0"], "--num-requests must be > 0"),
        (["--burstiness", "0", "--rate", "1"], "burstiness must be > 0"),
        (["--burstiness", "0.5"], "--burstiness only applies with --rate"),
        (["--all-at-once", "--concurrency", "4"], "contradict"),
        (["--backend", "openai"], "--backend openai needs --base-url"),
        (["--backend", "openai", "--base-url", "127.0.0.1:8000"], "must start with http://"),
        (["--base-url", "http://127.0.0.1:8000"], "--base-url applies to --backend openai"),
        (["--model", "m"], "--model applies to --backend openai only"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:{port}", "--connect-timeout",
          "3"], "cannot reach an OpenAI-compatible server"),
        (["--backend", "openai", "--base-url", "http://x", "--compare", __file__],
         "--compare starts pdserve clusters"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args, message, capsys):
    port = free_port()
    args = [a.replace("{port}", str(port)) for a in args]
    if "--target" not in args:
        args += ["--target", f"127.0.0.1:{port}"]  # nothing may be sent in these cases
    code = main([*args, "--no-progress", "--no-plots", "--out-dir", "/nonexistent/out"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--slo" in out
    assert "attainment" in out and "goodput" in out and "--backend" in out


def test_rate_sweep_writes_a_recomputable_report_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeServerThread(Pace(ttft=0.01, itl=0.004)) as target:
        code = main(
            [
                "--target",
                target,
                "--num-requests",
                "6",
                "--rates",
                "40,80",
                "--warmup",
                "2",
                "--input-len",
                "8:16",
                "--output-len",
                "2:4",
                "--slo",
                "ttft=2s,tpot=1s",
                "--out-dir",
                str(out),
                "--no-progress",
                "--seed",
                "4",
            ]
        )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "workload random: 6 requests" in stdout and "input tokens: total" in stdout
    assert "rate sweep" in stdout and "attainment >= 90%): 80 req/s" in stdout
    document = load_report(out / "bench.json")
    assert document["config"]["slo"] == "ttft=2000ms,tpot=1000ms"
    assert document["config"]["target_health"]["mode"] == "fake"
    runs = document["runs"]
    assert [run["arrival"]["rate"] for run in runs] == [40.0, 80.0]
    assert all(len(run["records"]) == 6 for run in runs)
    assert len(runs[0]["warmup_records"]) == 2  # kept in the file, not in the figures
    assert all(run["summary"]["requests"] == 6 for run in runs)
    assert recompute_summaries(document) == [run["summary"] for run in runs]
    for name in ("latency_cdf.png", "latency_vs_rate.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def fake_cluster(extra: str = "") -> str:
    return (f"{sys.executable} -m pdserve.bench.fake_server {{config}} "
            f"--ttft 0.01 --itl 0.002 {extra}")


def test_compare_starts_each_config_and_prints_ratios(tmp_path, capsys):
    configs = [tmp_path / "colocated.yaml", tmp_path / "disagg.yaml"]
    for config in configs:
        config.write_text("mode: fake\n")
    out = tmp_path / "out"
    code = main(
        [
            "--compare",
            *map(str, configs),
            "--serve-command",
            fake_cluster(),
            "--num-requests",
            "4",
            "--rate",
            "50",
            "--output-len",
            "2",
            "--input-len",
            "4",
            "--out-dir",
            str(out),
            "--no-progress",
            "--no-plots",
            "--warmup",
            "0",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    header = next(line for line in stdout.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "colocated", "disagg", "x", "colocated"]
    assert "TTFT p90 ms" in stdout and "goodput req/s" in stdout
    for name in ("colocated", "disagg"):
        assert len(load_report(out / f"{name}.json")["runs"][0]["records"]) == 4
        # The cluster was stopped with SIGINT and shut down cleanly.
        assert "stopped" in (out / f"cluster-{name}.log").read_text()


def test_compare_reports_a_cluster_that_dies_before_serving(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("x: 1\n")
    command = f"{sys.executable} -c 'import sys; print(\"boom\"); sys.exit(3)' {{config}}"
    code = main(
        [
            "--compare",
            str(config),
            "--serve-command",
            command,
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[-1].startswith("error: cluster") and "exited with code 3" in err[-1]
    assert "boom" in err[-1]


def test_each_rate_of_a_sweep_sends_its_own_prompts(capsys):
    """A server's prefix cache must not serve rate k from rate k-1's prompts."""
    from pdserve.bench.cli import make_plan

    plan = make_plan(["--rates", "1,2,4", "--num-requests", "5", "--input-len", "16:32",
                      "--seed", "11"])
    prompts = [[tuple(r.prompt_token_ids) for r in run] for run in plan.sweep_requests]
    assert len(prompts) == 3 and all(len(p) == 5 for p in prompts)
    assert prompts[0] == [tuple(r.prompt_token_ids) for r in plan.requests]
    assert not set(prompts[0]) & set(prompts[1])
    assert not set(prompts[1]) & set(prompts[2])
    # Deterministic: the same arguments plan the same sweep.
    again = make_plan(["--rates", "1,2,4", "--num-requests", "5", "--input-len", "16:32",
                       "--seed", "11"])
    assert [[tuple(r.prompt_token_ids) for r in run] for run in again.sweep_requests] == prompts
