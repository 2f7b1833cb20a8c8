"""`verify --tp/--ep/--target/--blackwell` and `inspect --tp` through the real command (Typer's CliRunner)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fp8conv.cli import app
from tests.test_targets_tp import llama_like, write_fp8

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_verify_tp_ok_exits_0(sample):
    r = run("verify", sample("llama-tiny-fp8"), "--sample", "1", "--tp", "1")
    assert r.exit_code == 0, r.output
    assert "works at TP 1" in r.output


def test_verify_tp_failing_size_exits_1_with_the_loaders_text(sample):
    r = run("verify", sample("llama-tiny-fp8"), "--sample", "1", "--tp", "1,2", "--json", "-")
    assert r.exit_code == 1, r.output
    payload = json.loads(r.stdout)
    cells = {(c["tp"], c["loader"]): c for c in payload["serving"]["tp"]}
    assert cells[(1, "vllm")]["ok"]
    assert cells[(2, "vllm")]["first"]["message"] == (
        "Weight output_partition_size = 64 is not divisible by weight quantization block_n = 128."
    )
    assert cells[(2, "sglang")]["first"]["tensor"] == "model.layers.0.self_attn.k_proj.weight"
    assert payload["serving"]["working_tp"] == [1]


def test_inspect_shows_the_tp_table_and_ep_fixes_the_experts(tmp_path):
    cfg, shapes = llama_like("Qwen3MoeForCausalLM", 256, 16, 4, 128, moe=(4, 384, "hf"))
    path = write_fp8(tmp_path / "moe", cfg, shapes)
    r = run("inspect", path, "--tp", "1,2")
    assert r.exit_code == 0, r.output  # inspect informs; verify decides
    assert "works at TP 1\n" in r.output and "expert parallelism" in r.output
    r = run("inspect", path, "--tp", "1,2", "--json", "-")
    cell = next(c for c in json.loads(r.stdout)["serving"]["tp"] if c["tp"] == 2 and c["loader"] == "vllm")
    assert cell["first"]["message"].startswith("The output_size of gate's and up's weight = 192 ")
    assert cell["fix"].startswith("expert parallelism (--enable-expert-parallel")
    r = run("inspect", path, "--tp", "1,2", "--ep")
    assert "works at TP 1, 2" in r.output


def test_unknown_architecture_fails_verify_and_says_so(tmp_path, sample):
    src = sample("llama-tiny-fp8")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = run("verify", src, "--sample", "1", "--tp", "1")
    assert r.exit_code == 1
    assert "FalconForCausalLM" in r.output and "not one fp8conv knows" in r.output


def test_bad_tp_list_is_a_usage_error(sample):
    r = run("verify", sample("llama-tiny-fp8"), "--tp", "two")
    assert r.exit_code == 2
    assert "--tp wants positive integers" in r.output


def test_blackwell_table_and_suggestion(sample):
    r = run("verify", sample("llama-tiny-fp8"), "--sample", "1", "--blackwell")
    assert r.exit_code == 0, r.output
    assert "Blackwell UE8M0 requant" in r.output
    assert "--scale-fmt ue8m0" in r.output


def test_named_target_that_does_not_load_exits_1(sample):
    r = run("verify", sample("llama-tiny-fp8"), "--sample", "1", "--target", "compressed-tensors")
    assert r.exit_code == 1
    assert "compressed-tensors reads only" in r.output.replace("\n", " ")
