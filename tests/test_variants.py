from __future__ import annotations

import json

import pytest

from hrnet_core import variants
from hrnet_core.errors import UnknownVariantError
from hrnet_triton.cli import main

SEED_NAMES = [
    "HRNet_W18_C",
    "HRNet_W18_C_ssld",
    "HRNet_W30_C",
    "HRNet_W32_C",
    "HRNet_W40_C",
    "HRNet_W44_C",
    "HRNet_W48_C",
    "HRNet_W48_C_ssld",
    "HRNet_W64_C",
    "SE_HRNet_W64_C_ssld",
]


def test_variants_are_the_ten_seed_rows_in_order():
    assert variants.names() == SEED_NAMES


def test_variant_facts_follow_from_the_name():
    v = variants.get("SE_HRNet_W64_C_ssld")
    assert (v.width, v.has_se, v.flavour, v.arch) == (64, True, variants.Flavour.SSLD, "SE_HRNet_W64_C")
    assert v.pretrained_url.endswith("/dygraph/legendary_models/SE_HRNet_W64_C_ssld_pretrained.pdparams")
    assert v.inference_url.endswith("/dygraph/inference/SE_HRNet_W64_C_ssld_infer.tar")
    assert variants.get("HRNet_W48_C").flops_g == pytest.approx(34.58)


def test_variant_rejects_facts_that_contradict_its_name():
    with pytest.raises(ValueError, match="does not match"):
        variants.Variant("HRNet_W18_C", 30, False, variants.Flavour.STANDARD, 0.7, 0.9, None, None, 1.0, 1.0)


def test_get_raises_with_suggestion_when_the_case_is_wrong():
    with pytest.raises(UnknownVariantError, match="Did you mean HRNet_W18_C"):
        variants.get("hrnet_w18_c")


def test_cli_variants_lists_the_ten_seed_names(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert listed == SEED_NAMES


def test_cli_variants_json_carries_weight_urls(capsys):
    assert main(["variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == SEED_NAMES
    assert all(r["pretrained_url"].endswith(f"{r['name']}_pretrained.pdparams") for r in rows)
    assert all(r["inference_url"].endswith(f"{r['name']}_infer.tar") for r in rows)


def test_cli_reports_unknown_variant_without_traceback(capsys):
    assert main(["export", "HRNet_W99_C", "--weights", "offline", "--out", "x.onnx"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'HRNet_W99_C'" in err and "Traceback" not in err


def test_cli_output_cut_short_by_its_reader_is_not_an_error():
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "hrnet-triton"
    run = subprocess.run(f"'{cli}' variants --urls | head -n 1", shell=True, capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("model") and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr
