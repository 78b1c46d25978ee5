"""The README's main offline command: `sparse-lavida demo` runs both samplers and reports the ratio."""

import json

from sparse_lavida_vllm.cli import main


def test_demo_reports_both_samplers_and_token_ratio(capsys):
    assert main(["demo", "--json", "--gen-length", "64", "--block-length", "16", "--steps", "16",
                 "--num-registers", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["sparse_tokens"]) == len(report["dense_tokens"]) == 64
    f = report["forward_tokens"]
    assert f["sparse"] < f["dense"] and report["token_ratio"] == f["dense"] / f["sparse"]
    assert report["steps"] == 16 and report["seconds"]["sparse"] > 0
