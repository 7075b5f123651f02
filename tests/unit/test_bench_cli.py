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
        (["--workload", "chat", "--num-system-prompts", "0"], "--num-system-prompts must be > 0"),
        (["--workload", "chat", "--tokenizer", "none", "--num-users", "2",
          "--num-system-prompts", "3"], "--num-system-prompts must be between 1 and"),
        (["--workload", "chat", "--system-len", "-1"], "--system-len must be >= 0"),
        (["--workload", "chat", "--num-users", "0"], "--num-users must be > 0"),
        (["--workload", "chat", "--tokenizer", "none", "--num-users", "2", "--turns", "2",
          "--num-requests", "5"], "chat makes 4 requests, fewer than --num-requests 5"),
        (["--workload", "chat", "--tokenizer", "/nonexistent/t.json"], "tokenizer file not found"),
        (["--workload", "chat", "--tokenizer", "no-such-model"], "unknown model 'no-such-model'"),
        (["--workload", "chat", "--dataset", "/nonexistent/x.json", "--tokenizer", "none"],
         "dataset file not found"),
        (["--workload", "long-doc", "--num-docs", "0"], "--num-docs must be > 0"),
        (["--workload", "long-doc", "--questions-per-doc", "0"],
         "--questions-per-doc must be > 0"),
        (["--workload", "long-doc", "--tokenizer", "none", "--doc-len", "0"],
         "--doc-len must satisfy"),
        (["--workload", "long-doc", "--tokenizer", "none", "--doc-len", "4000"],
         "exceeds --max-len 2048"),
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


def test_chat_and_long_doc_plans(capsys):
    """The CLI builds the text workloads: sizes from --num-requests, a warm-up and each
    further rate of a sweep with prompts of their own, the repeated share printed."""
    from pdserve.bench.cli import make_plan

    common = ["--tokenizer", "none", "--rates", "1,2", "--warmup", "2", "--seed", "3"]
    plan = make_plan(["--workload", "chat", "--num-requests", "10", "--turns", "3",
                      "--system-len", "128", *common])
    assert [r.tag for r in plan.requests][:5] == [
        "user0/turn0", "user1/turn0", "user2/turn0", "user3/turn0", "user0/turn1"]
    assert len(plan.requests) == 10 and len(plan.warmup) == 2
    measured = {r.prompt_token_ids[:16] for r in plan.requests}
    assert not measured & {r.prompt_token_ids[:16] for r in plan.warmup}
    assert not measured & {r.prompt_token_ids[:16] for r in plan.sweep_requests[1]}
    plan = make_plan(["--workload", "long-doc", "--num-docs", "2", "--questions-per-doc", "3",
                      "--doc-len", "256", "--output-len", "8", *common])
    assert [r.tag for r in plan.requests] == [f"doc{d}/q{q}" for q in range(3) for d in range(2)]
    assert {r.output_len for r in plan.requests} == {8}
    out = capsys.readouterr().out
    assert "workload chat: 10 requests" in out and "workload long-doc: 6 requests" in out
    assert out.count("prompt tokens repeating an earlier prompt's prefix") == 2


def test_chat_run_against_a_server(tmp_path, capsys):
    """End to end against the paced stand-in server with SmolLM2's real tokenizer (the
    default): every request completes with the output length the dataset's reply set."""
    out = tmp_path / "out"
    with FakeServerThread(Pace(ttft=0.005, itl=0.001)) as target:
        code = main(["--target", target, "--workload", "chat", "--num-users", "2", "--turns",
                     "2", "--num-system-prompts", "1", "--system-len", "64", "--output-len",
                     "1:3", "--concurrency", "2", "--warmup", "0", "--out-dir", str(out),
                     "--no-progress", "--no-plots"])
    assert code == 0, capsys.readouterr().err
    records = load_report(out / "bench.json")["runs"][0]["records"]
    assert len(records) == 4 and all(r.ok for r in records)
    # The server counted exactly the ids the workload said it sent, and the turns grew.
    assert all(r.prompt_tokens == r.input_len > 64 for r in records)
    turns = {r.tag: r for r in records}
    assert turns["user0/turn1"].input_len > turns["user0/turn0"].input_len
    assert all(1 <= r.completion_tokens <= 3 for r in records)
