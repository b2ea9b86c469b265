"""``hierasparse-gen eval`` on a tiny random-weight Llama saved to a folder, with the byte-level
tokenizer (no downloads, seconds on the CPU): values of the rows, the JSON fields, passkey
entries, bytes per token, and the errors for bad input."""

import json
import random

import pytest
import torch

from hf_models import tiny_model
from hierasparse_gen import cli
from hierasparse_gen.evaluate import settings_grid
from hierasparse_gen.evaluate.cli import main as eval_main
from hierasparse_gen.evaluate.load import ByteTokenizer, _markdown_to_text, resolve_model
from hierasparse_gen.errors import InputError

WORDS = ("the king queen castle night ghost sword river bright cold answer stand unfold "
         "watch friend guard heart mouse quiet bed hour twelve").split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(layers=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(600)) + "\n")
    return path


def _args(model_dir, text_file, *extra):
    return ["--model", str(model_dir), "--tokenizer", "bytes", "--text", str(text_file), "--device", "cpu",
            "--sink", "64", "--window", "64", "--block-size", "64", "--prefill", "640", "--decode", "24",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def result(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    argv = _args(model_dir, text_file, "--key-ratios", "0,1", "--value-ratios", "0,0.5,1", "--grid", "axes",
                 "--passkey-lengths", "320,448", "--passkey-depths", "0,0.5,1", "--json", str(out / "r.json"),
                 "--plot", str(out / "r.png"))
    assert cli.main(["eval", *argv]) == 0
    return json.loads((out / "r.json").read_text()), out


def _row(res, k, v, policy="attention+query_k+weighted_v"):
    (row,) = [r for r in res["rows"] if r["key_ratio"] == k and r["value_ratio"] == v and r["policy"] == policy]
    return row


def test_ratio_zero_equals_dense(result):
    res, _ = result
    row = _row(res, 0.0, 0.0)
    assert row["kl"] < 1e-8
    assert row["top1"] == 1.0
    assert row["ppl"] == pytest.approx(res["dense"]["ppl"], rel=1e-6)
    assert row["ppl_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert res["dense_check"]["steps"] == 4 and res["dense_check"]["max_abs_logit_diff"] < 1e-3


def test_ratio_one_differs(result):
    res, _ = result
    for k, v in ((1.0, 0.0), (0.0, 1.0)):
        row = _row(res, k, v)
        assert row["kl"] > 1e-4, (k, v)
        assert row["ppl"] != pytest.approx(res["dense"]["ppl"], rel=1e-6)


def test_json_has_every_field(result):
    res, _ = result
    for key in ("model", "model_source", "tokenizer", "text", "text_tokens", "backend", "prefill", "decode", "date",
                "machine", "torch", "dtype", "dense_check", "dense", "rows"):
        assert key in res, key
    assert res["backend"] == "simulate" and res["prefill"] == 640 and res["decode"] == 24
    for key in ("nll", "ppl", "bytes_per_token", "passkey"):
        assert key in res["dense"], key
    assert len(res["rows"]) == 8  # axes: (0,0), (0,0.5), (0,1), (1,0), for each of the two default policies
    assert [r["policy"] for r in res["rows"]] == ["attention+query_k+weighted_v"] * 4 + ["prune_loss"] * 4
    for row in res["rows"]:
        for key in ("policy", "key_ratio", "value_ratio", "sink", "window", "prefill_mode", "nll", "ppl", "ppl_ratio",
                    "kl", "top1", "bytes_per_token", "dense_bytes_per_token", "bytes_fraction", "passkey"):
            assert key in row, key
        assert row["sink"] == 64 and row["window"] == 64
        assert row["prefill_mode"] == "attend_then_compress"


def test_passkey_one_entry_per_length_and_depth(result):
    res, _ = result
    want = [(n, d) for n in (320, 448) for d in (0.0, 0.5, 1.0)]
    for entries in [res["dense"]["passkey"]] + [r["passkey"] for r in res["rows"]]:
        assert [(e["length"], e["depth"]) for e in entries] == want
        assert all(0.0 <= e["accuracy"] <= 1.0 and e["trials"] == 1 for e in entries)


def test_bytes_per_token_fall_with_the_ratio(result):
    res, out = result
    v = [_row(res, 0.0, r)["bytes_per_token"] for r in (0.0, 0.5, 1.0)]
    assert v[0] > v[1] > v[2]
    assert _row(res, 1.0, 0.0)["bytes_per_token"] < v[0]
    assert _row(res, 0.0, 0.0)["bytes_fraction"] == pytest.approx(1.0, abs=0.01)  # the block table only
    # a dense 16-bit cache of 2 layers x 2 KV heads x head_dim 128, K and V
    assert res["dense"]["bytes_per_token"] == 2 * 2 * 2 * 128 * 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "r.png").stat().st_size > 1000


def test_table_on_stdout(model_dir, text_file, capsys):
    assert eval_main(_args(model_dir, text_file, "--value-ratios", "0,1", "--decode", "4",
                           "--check-steps", "0")) == 0
    out = capsys.readouterr().out
    assert "ppl/dense" in out and "prune_loss" in out and "dense" in out


@pytest.mark.parametrize("extra, message", [
    (["--model", "no/such/model"], "no such file or folder. Fix:"),
    (["--value-ratios", "0,1.5"], "value ratio 1.5 is outside [0, 1]. Fix:"),
    (["--key-ratios", "-0.5"], "key ratio -0.5 is outside [0, 1]. Fix:"),
    (["--prefill", "5000"], "the text has"),
    (["--policies", "psychic"], "policy 'psychic' is not known. Fix:"),
    (["--text", "no/such/file.txt"], "does not exist. Fix:"),
    (["--passkey-lengths", "99999"], "Fix:"),
    (["--sink", "10"], "Fix:"),
    (["--decode", "0"], "must be at least 1. Fix:"),
    (["--json", "no/such/folder/out.json"], "is not a writable folder. Fix:"),
    (["--plot", "no/such/folder/out.png"], "is not a writable folder. Fix:"),
])
def test_bad_input_is_explained(model_dir, text_file, extra, message, capsys):
    assert eval_main(_args(model_dir, text_file, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix:" in err


def test_prefill_longer_than_text_message(model_dir, text_file, capsys):
    assert eval_main(_args(model_dir, text_file, "--prefill", "5000")) == 2
    err = capsys.readouterr().err
    assert "prefill 5000 + decode 24 needs 5025 tokens" in err and "Fix: pass a longer --text" in err


def test_unparsable_ratio_is_a_usage_error(model_dir, text_file, capsys):
    with pytest.raises(SystemExit):
        eval_main(_args(model_dir, text_file, "--value-ratios", "half"))
    assert "not a comma-separated list of numbers. Fix:" in capsys.readouterr().err


def test_resolve_model_errors(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="not a .gguf"):
        resolve_model(str(f))


def test_settings_grid_axes_and_product():
    axes = settings_grid([0, 0.5], [0, 0.25], sink=64, window=256, grid="axes")
    assert [(s.key_ratio, s.value_ratio) for s in axes] == [(0, 0), (0, 0.25), (0.5, 0)]
    prod = settings_grid([0, 0.5], [0, 0.25], sink=64, window=256)
    assert len(prod) == 4 and {s.policy for s in prod} == {"prune_loss"}


def test_byte_tokenizer_and_markdown():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("pass key 12345")) == "pass key 12345"
    md = "# Hamlet\n\n## ACT I\n\n**BERNARDO**  \nWho's there?\n\n_Exit_\n"
    assert _markdown_to_text(md) == "Hamlet\n\nACT I\n\nBERNARDO\nWho's there?\n\nExit\n"
    assert torch.tensor(tok.encode("é")).tolist() == [195, 169]


@pytest.mark.parametrize("policy", ["prune_loss", "attention+query_k+weighted_v", "expected_error"])
def test_shortcuts_give_the_exact_numbers(model_dir, text_file, tmp_path, policy):
    """The reused dense prefill (fastsim, with its captured queries) against prefilling through the model."""
    got = {}
    for name, extra in (("fast", []), ("exact", ["--exact"])):
        path = tmp_path / f"{name}.json"
        assert eval_main(_args(model_dir, text_file, "--key-ratios", "0.5", "--value-ratios", "1", "--decode", "70",
                               "--check-steps", "0", "--policies", policy, "--json", str(path), *extra)) == 0
        got[name] = json.loads(path.read_text())
    fast, exact = got["fast"]["rows"][0], got["exact"]["rows"][0]
    assert fast["prefill_reused"] and not exact["prefill_reused"]
    for key in ("nll", "kl", "top1", "bytes_per_token"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-5, abs=1e-7), key


def test_packaged_model_not_installed_is_explained(monkeypatch):
    from hierasparse_gen.evaluate import load
    monkeypatch.setitem(load.PACKAGED_MODELS, "nosuch", ("no_such_package_xyz", "m.gguf", "pip install nosuch"))
    with pytest.raises(InputError, match=r"is not installed\. Fix: pip install nosuch"):
        resolve_model("nosuch")
