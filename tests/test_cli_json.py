"""--json on merge and verify: one JSON object on stdout with every key, for success and failure alike (the
error with its exit code); everything else on stderr; the exit code unchanged. And the combination flags."""

from __future__ import annotations

import json
import subprocess
import sys

import helpers_tiny as ht
import pytest
from conftest import REPO

from streammerge.cli import main
from streammerge.results import MERGE_KEYS, VERIFY_KEYS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("json")
    base = ht.make_base(root / "base")
    a = ht.make_adapter(root / "a", base, seed=1)
    b = ht.make_adapter(root / "b", base, r=2, targets=("k_proj", "q_proj"), seed=2)
    other = ht.make_adapter(root / "other", ht.make_base(root / "other-base", hidden=24), seed=3)
    return root, base, a, b, other


def _one_record(out: str, keys) -> dict:
    lines = out.splitlines()
    assert len(lines) == 1, out
    record = json.loads(lines[0])
    assert {"command", "ok", "exit_code", "error", *keys} == set(record), set(record) ^ set(keys)
    return record


def test_merge_json_success(setup, tmp_path, capsys):
    _, base, a, _, _ = setup
    out_dir = tmp_path / "m"
    code = main(["--base", str(base), "--adapter", str(a), "--output", str(out_dir), "--json", "--verify"])
    out, err = capsys.readouterr()
    assert code == 0
    r = _one_record(out, MERGE_KEYS)
    assert (r["command"], r["ok"], r["exit_code"], r["error"]) == ("merge", True, 0, None)
    assert r["output"] == str(out_dir) and r["adapters"] == [str(a)] and r["weights"] is None
    assert r["shards"] == ["model.safetensors"] and (out_dir / "model.safetensors").is_file()
    assert r["tensors_merged"] == 4 and r["tensors_copied"] == 17 and r["layout"] == "causal-lm"
    assert r["bytes_written"] > 0 and r["seconds"] > 0 and r["peak_memory"] > 0 and r["dtype"] == "bf16"
    assert "config.json" in r["files_copied"] and r["notes"] == [] and r["warnings"] == []
    assert r["verify"]["ok_values"] and r["verify"]["tensors_checked"] == 21 and r["verify"]["problems"] == []
    assert "Done. Merged model:" in err and "[1/3] Plan" in err  # the usual lines, on stderr


def test_merge_json_failure(setup, tmp_path, capsys):
    _, base, _, _, other = setup
    code = main(["--base", str(base), "--adapter", str(other), "--output", str(tmp_path / "m"), "--json"])
    out, err = capsys.readouterr()
    assert code == 4
    r = _one_record(out, MERGE_KEYS)
    assert (r["ok"], r["exit_code"]) == (False, 4)
    assert r["error"]["exit_code"] == 4 and r["error"]["type"] == "PlanError"
    assert "does not fit base" in r["error"]["message"]
    assert r["shards"] is None and r["tensors_merged"] is None and r["adapters"] == [str(other)]
    assert err.strip().splitlines()[-1] == "error: " + r["error"]["message"]


def test_merge_json_dry_run_and_warnings(setup, tmp_path, capsys):
    _, base, a, _, _ = setup
    code = main(["--base", str(base), "--adapter", str(a), "--output", str(tmp_path / "m"), "--json", "--dry-run",
                 "--clamp-f16"])
    r = _one_record(capsys.readouterr().out, MERGE_KEYS)
    assert code == 0 and r["dry_run"] and r["bytes_written"] == 0 and r["tensors_merged"] == 4
    assert any("--clamp-f16 has no effect" in w for w in r["warnings"])
    assert not (tmp_path / "m").exists()


def test_verify_json(setup, tmp_path, capsys):
    _, base, a, b, _ = setup
    merged = tmp_path / "m"
    assert main(["--base", str(base), "--adapter", str(a), "--adapter", str(b), "--weights", "0.5,2",
                 "--output", str(merged), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["verify", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--weights", "0.5,2",
                 "--merged", str(merged), "--json", "--all-rows"])
    r = _one_record(capsys.readouterr().out, VERIFY_KEYS)
    assert code == 0 and r["ok"] and r["ok_values"] and r["weights"] == [0.5, 2.0]
    assert r["tensors_checked"] == 21 and r["rows_checked"] == r["rows"] > 0 and r["max_ulps"] == 0
    # the same output is not what other weights give: exit 9, the problems listed
    code = main(["verify", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--weights", "0.5,1",
                 "--merged", str(merged), "--json"])
    out, err = capsys.readouterr()
    r = _one_record(out, VERIFY_KEYS)
    assert code == 9 and not r["ok"] and not r["ok_values"] and r["exit_code"] == 9
    assert r["error"]["type"] == "VerifyError" and r["problems"] and r["worst_tensor"]
    assert "error: merged model differs" in err


def test_verify_json_missing_folder(setup, tmp_path, capsys):
    _, base, a, _, _ = setup
    code = main(["verify", "--base", str(base), "--adapter", str(a), "--merged", str(tmp_path / "nope"), "--json"])
    r = _one_record(capsys.readouterr().out, VERIFY_KEYS)
    assert code == 3 and r["error"] == {"type": "MissingFileError", "exit_code": 3, "message": r["error"]["message"]}
    assert "not found" in r["error"]["message"] and r["tensors_checked"] is None


def test_combination_flags(setup, tmp_path, capsys):
    import streammerge

    _, base, a, b, _ = setup
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert main(["--base", str(base), "--adapter", str(a), "--adapter", str(b), "--weights=-0.5,1.5",
                 "--output", str(cli_out), "--no-progress"]) == 0
    assert "Adapter : -0.5 x " in capsys.readouterr().out
    streammerge.merge(str(base), [str(a), str(b)], str(api_out), weights=[-0.5, 1.5])
    assert (cli_out / "model.safetensors").read_bytes() == (api_out / "model.safetensors").read_bytes()
    for argv, message in ((["--weights", "1"], "1 weight(s) for 2 --adapter(s)"),
                          (["--weights", "1,x"], "invalid weights"), (["--weights", "1,inf"], "finite")):
        with pytest.raises(SystemExit) as e:
            main(["--base", str(base), "--adapter", str(a), "--adapter", str(b), "--output", str(tmp_path / "x"),
                  *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_stdout_holds_only_json_in_a_real_process(setup, tmp_path):
    _, base, a, _, _ = setup
    r = subprocess.run([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(a), "--output",
                        str(tmp_path / "m"), "--json", "--verify"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True and r.stdout.count("\n") == 1
